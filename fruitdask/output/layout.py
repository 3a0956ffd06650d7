"""The names of a run output's files and folders: one constant per name (the package's
docstring, :mod:`fruitdask.output`, says what each holds).

A leaf that imports only the storage's markers, so that the features table
(:mod:`fruitdask.lake`) names its folder from here without importing the readers.
``_SUCCESS`` and ``run.json`` are also the storage's markers of a fruitdask output (what
``--overwrite`` may replace): :mod:`fruitdask.storage.paths` holds them, and they are
re-exported here under the same names.
"""

from __future__ import annotations

from fruitdask.storage.paths import RUN_JSON, SUCCESS_MARKER

#: The Delta table of features (:mod:`fruitdask.lake.table`).
FEATURES = "features"
#: Every PCA fit the table's rows name: ``pca/<fit>.npz``.
FITS = "pca"
ERRORS = "errors.parquet"
REDUCTION = "reduction.npz"
SCREE = "scree.png"
REPORT = "report.html"
DASK_REPORT = "dask-report.html"
#: Every run's record and report, kept: ``runs/<run_id>/``.
RUNS = "runs"

#: What a run writes at the top of its output (a first run killed early leaves some of them).
OUTPUT_NAMES = frozenset({FEATURES, FITS, RUNS, ERRORS, REDUCTION, SCREE, RUN_JSON, REPORT, DASK_REPORT, SUCCESS_MARKER})

__all__ = ["DASK_REPORT", "ERRORS", "FEATURES", "FITS", "OUTPUT_NAMES", "REDUCTION", "REPORT", "RUNS", "RUN_JSON", "SCREE",
           "SUCCESS_MARKER"]
