"""The featurization settings: what decides a partition's features, as one value.

Built once from the run configuration (:meth:`FeatureSettings.from_config`) and passed whole
to the partition function (:func:`fruitdask.features.frames.featurize_frame`) on Dask workers
and Spark executors, to the checkpoint fingerprint and to the classifier bundle. Frozen and
picklable: it travels inside each task. The thread count is not part of it: it is a runtime
value of each worker.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fruitdask.config import RunConfig
from fruitdask.storage import options


@dataclass(frozen=True)
class FeatureSettings:
    """Weights digest, image size, pooling, batch size and precision of the forward pass, and
    the fsspec ``storage_options`` the images are read with.

    ``storage_options`` decide where the bytes come from, not what the features are: they are
    left out of equality and hashing.
    """

    weights_key: str
    image_size: int
    pooling: str
    batch_size: int
    precision: str = "float32"
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @classmethod
    def from_config(cls, cfg: RunConfig, weights_key: str) -> FeatureSettings:
        """The settings of a run of ``cfg`` whose weights have the digest ``weights_key``."""
        return cls(
            weights_key=weights_key,
            image_size=int(cfg.image_size),
            pooling=cfg.pooling,
            batch_size=int(cfg.batch_size),
            precision=cfg.precision,
            storage_options=options.storage_options(cfg.storage),
        )
