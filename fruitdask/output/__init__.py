"""The output contract: what a run writes, under which names, how it publishes them, and
how they are read back. The one place that describes the layout::

    OUTPUT/
      features/             the Delta table (fruitdask.lake): one row per current image
      pca/<fit>.npz         every PCA fit the table's rows name (``pca_fit`` column)
      errors.parquet        the current unusable images: path, label, stage, reason, image_key, source_version, run_id
      reduction.npz         the current fit (a copy: :class:`fruitdask.reduce.Reduction`), scree.png its plot
      run.json              the last run's :class:`RunRecord`; report.html, dask-report.html
      runs/<run_id>/        every run's run.json, report.html and dask-report.html (and daily.json of `daily`), kept
      _SUCCESS              written once a run has committed and published

- :mod:`~fruitdask.output.layout`: one constant per name above (``FEATURES``, ``FITS``,
  ``ERRORS``...) and ``OUTPUT_NAMES``, the names a run writes at the top;
- :mod:`~fruitdask.output.record`: :class:`RunRecord` (``run.json``), :func:`read_run` and
  :class:`CommittedRun`, the one way back in (``train``, the report, the benchmark);
- :mod:`~fruitdask.output.publish`: :func:`publish`, after the table's commit, and
  :func:`republish`, for a run that committed but did not finish publishing.

The hidden siblings beside an output (staging, lock, checkpoints) are the storage's
(:mod:`fruitdask.storage.paths`).
"""

from __future__ import annotations

from fruitdask.output.layout import (
    DASK_REPORT,
    ERRORS,
    FEATURES,
    FITS,
    OUTPUT_NAMES,
    REDUCTION,
    REPORT,
    RUN_JSON,
    RUNS,
    SCREE,
    SUCCESS_MARKER,
)
from fruitdask.output.publish import Pages, publish, republish
from fruitdask.output.record import NOT_A_RUN_HINT, CommittedRun, RunRecord, errors_parquet, read_run

__all__ = [
    "DASK_REPORT", "ERRORS", "FEATURES", "FITS", "NOT_A_RUN_HINT", "OUTPUT_NAMES", "REDUCTION", "REPORT", "RUNS", "RUN_JSON",
    "SCREE", "SUCCESS_MARKER", "CommittedRun", "Pages", "RunRecord", "errors_parquet", "publish", "read_run", "republish",
]
