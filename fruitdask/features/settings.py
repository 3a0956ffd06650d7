"""The featurization settings: what decides a partition's features, as one value.

Built once from the run configuration (:meth:`FeatureSettings.from_config`), as soon as the
precision is resolved and before the weights are read: the workers' warm-up needs the graph's
shape (:func:`fruitdask.features.model.warm_up`), not the weights. The weights' digest is added
when they are known (:meth:`FeatureSettings.with_weights`); the same value then goes whole to
the partition function (:func:`fruitdask.features.frames.featurize_frame`) on Dask workers and
Spark executors, to the checkpoint fingerprint, the table's fingerprint and the classifier
bundle. Frozen and picklable: it travels inside each task. The thread count is not part of it:
it is a runtime value of each worker.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fruitdask.config import RunConfig
from fruitdask.storage import options

#: ``weights_key`` of settings built before the weights are read (enough for a warm-up).
NO_WEIGHTS_YET = ""


@dataclass(frozen=True)
class FeatureSettings:
    """Weights digest, image size, pooling, batch size, precision and runtime of the forward pass, and
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
    #: The inference runtime that computes them (:mod:`fruitdask.features.runtimes`).
    runtime: str = "tensorflow"
    #: int8's calibration set (:mod:`fruitdask.features.calibration`), as JSON: the image keys,
    #: their digest and the root they are read from; ``None`` for the other precisions.
    calibration: str | None = None

    @classmethod
    def from_config(cls, cfg: RunConfig, weights_key: str = NO_WEIGHTS_YET, precision: str | None = None) -> FeatureSettings:
        """The settings of a run of ``cfg``: ``precision`` as resolved for the hardware (else
        ``cfg.precision``), ``weights_key`` the weights' digest once they are read."""
        return cls(
            weights_key=weights_key,
            image_size=int(cfg.image_size),
            pooling=cfg.pooling,
            batch_size=int(cfg.batch_size),
            precision=precision or cfg.precision,
            runtime=cfg.runtime if cfg.runtime != "auto" else "tensorflow",  # auto: pipeline._with_runtime
            storage_options=options.storage_options(cfg.storage),
        )

    def with_weights(self, weights_key: str) -> FeatureSettings:
        """These settings for the weights of digest ``weights_key``."""
        return dataclasses.replace(self, weights_key=weights_key)

    def with_precision(self, precision: str) -> FeatureSettings:
        """These settings with the precision the workers resolved (``auto`` answered)."""
        return dataclasses.replace(self, precision=precision)

    @property
    def feature_dim(self) -> int:
        """Length of one feature vector: 512 pooled, the flattened last maps unpooled."""
        if self.pooling == "none":
            side = self.image_size // 32
            return side * side * 512
        return 512

    def to_json(self) -> str:
        """The settings as one JSON string (for a worker's ``preload_argv``), storage options
        left out: they are not needed to build a graph, and argv is no place for them."""
        return json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "storage_options"})

    @classmethod
    def from_json(cls, text: str) -> FeatureSettings:
        """The settings :meth:`to_json` wrote."""
        doc = json.loads(text)
        return cls(weights_key=str(doc["weights_key"]), image_size=int(doc["image_size"]), pooling=str(doc["pooling"]),
                   batch_size=int(doc["batch_size"]), precision=str(doc["precision"]),
                   runtime=str(doc.get("runtime", "tensorflow")), calibration=doc.get("calibration"))
