"""The featurization settings: what decides a partition's features, as one value.

Built once from the run configuration (:meth:`FeatureSettings.from_config`), as soon as the
precision is resolved and before the weights are read: the workers' warm-up needs the graph's
shape (:func:`fruitdask.features.model.warm_up`), not the weights. The weights' digest is added
when they are known (:meth:`FeatureSettings.with_weights`); the same value then goes whole to
the partition function (:func:`fruitdask.features.frames.featurize_frame`) on Dask workers and
Spark executors, and every other place derives from it:

* the table's fingerprint (:meth:`FeatureSettings.fingerprint`, through
  :func:`fruitdask.lake.keys.settings_fingerprint`) and the checkpoint key
  (:meth:`FeatureSettings.checkpoint_key`, through :func:`fruitdask.checkpoint.fingerprint`);
* the table's commit description, ``run.json``'s ``features``, the classifier bundle's
  ``preprocessing`` and the Dask workers' preload argument, all through the one serialization
  :meth:`FeatureSettings.to_dict` / :meth:`FeatureSettings.from_dict` (documents written
  before a field existed read it as its default);
* whether two of them may be mixed: :func:`differences` (empty when compatible).

Frozen and picklable: it travels inside each task. The thread count is not part of it: it is
a runtime value of each worker.
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
#: The inference runtime of every table, run and bundle written before runtimes were recorded.
DEFAULT_RUNTIME = "tensorflow"
#: The batch size of a document that does not record one (the table's description before it did).
DEFAULT_BATCH_SIZE = RunConfig.batch_size
#: The fields that decide the numbers of a feature vector, in the order :func:`differences`
#: reports them: features that differ in one of them live in another space.
FEATURE_FIELDS = ("image_size", "pooling", "weights_key", "precision", "runtime", "calibration")
#: How each field is named in a document (:meth:`FeatureSettings.to_dict`) and in messages.
_DOC_NAMES = {"weights_key": "weights_sha256"}


@dataclass(frozen=True)
class FeatureSettings:
    """What decides the features of an image, and how they are computed.

    Fields that **change the features** (:data:`FEATURE_FIELDS`; two settings that differ in
    one are incompatible, :func:`differences`):

    ``weights_key``
        the sha256 of the VGG16 weights' arrays (``NO_WEIGHTS_YET`` before they are read);
    ``image_size``, ``pooling``
        the network's input side and how its last maps become a vector;
    ``precision``
        of the forward pass (``float32``, ``bfloat16``: bf16 features differ by ~0.5 %);
    ``runtime``
        the inference runtime that runs the network (``tensorflow``, today's Keras; tables
        and bundles from before it was recorded are ``tensorflow``);
    ``calibration``
        an int8 runtime's calibration sample (:mod:`fruitdask.features.calibration`: JSON of
        its image keys, their root and their digest; only the digest enters a fingerprint, so
        a lake moved to another root keeps it), ``None`` for runtimes that need none (then it
        is left out of every fingerprint, which therefore did not move).

    Fields that **do not** (they may differ between two runs of one table):

    ``batch_size``
        images per forward pass: it changes the speed, not the numbers beyond rounding;
    ``storage_options``
        where the bytes are read from: left out of equality, hashing and :meth:`to_dict`.
    """

    weights_key: str
    image_size: int
    pooling: str
    batch_size: int
    precision: str = "float32"
    storage_options: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    runtime: str = DEFAULT_RUNTIME
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
            runtime=cfg.runtime if cfg.runtime != "auto" else DEFAULT_RUNTIME,  # auto: pipeline._with_runtime decides
            storage_options=options.storage_options(cfg.storage),
        )

    def with_weights(self, weights_key: str) -> FeatureSettings:
        """These settings for the weights of digest ``weights_key``."""
        return dataclasses.replace(self, weights_key=weights_key)

    def with_precision(self, precision: str) -> FeatureSettings:
        """These settings with the precision the workers resolved (``auto`` answered)."""
        return dataclasses.replace(self, precision=precision)

    def with_batch_size(self, batch_size: int) -> FeatureSettings:
        """These settings featurizing ``batch_size`` images at a time (the same features)."""
        return dataclasses.replace(self, batch_size=int(batch_size))

    def with_storage(self, storage_options: Mapping[str, Any] | None) -> FeatureSettings:
        """These settings reading images with ``storage_options`` (the same features)."""
        return dataclasses.replace(self, storage_options=dict(storage_options or {}))

    @property
    def feature_dim(self) -> int:
        """Length of one feature vector: 512 pooled, the flattened last maps unpooled."""
        if self.pooling == "none":
            side = self.image_size // 32
            return side * side * 512
        return 512

    # --- fingerprints ----------------------------------------------------------------------

    def fingerprint(self, version_tag: str) -> str:
        """16 hex digits of what decides the features (:data:`FEATURE_FIELDS`) and
        ``version_tag`` (the table's format): the table's ``settings`` column. The batch size
        is left out: runs of other batch sizes update the same table."""
        text = f"{version_tag}|{self.weights_key}|{self.image_size}|{self.pooling}|{self.precision}{self._identity()}"
        return _digest(text)

    def checkpoint_key(self, version_tag: str) -> str:
        """16 hex digits naming the checkpoints of a run of these settings (``version_tag``:
        the checkpoints' format). What decides the features, and the batch size too: a
        partition is featurized in batches of ``batch_size``, and the kernels a batch shape
        selects may round the last bits otherwise, so a resumed run reuses only partitions
        that are bit for bit what this run would compute (and the names of the checkpoints
        written before this value existed stay valid). float32 is left out as it was before
        ``--precision`` existed, for the same reason."""
        if not self.weights_key:  # built before the weights were read: good for a warm-up, not for a name
            raise ValueError("feature settings without the weights' digest have no fingerprint: use settings.with_weights(sha256)")
        text = f"{version_tag}|{self.weights_key}|{self.image_size}|{self.pooling}|{self.batch_size}"
        if self.precision != "float32":
            text += f"|{self.precision}"
        return _digest(text + self._identity())

    def _identity(self) -> str:
        """The runtime's part of a fingerprint: empty for TensorFlow without calibration, so
        that the fingerprints of everything written before runtimes existed do not move."""
        text = "" if self.runtime == DEFAULT_RUNTIME else f"|runtime={self.runtime}"
        return text if self.calibration is None else f"{text}|calibration={calibration_digest(self.calibration)}"

    # --- the one serialization -------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-ready dict (``weights_sha256`` for ``weights_key``), storage
        options left out: the table's description, ``run.json``'s ``features``, a bundle's
        ``preprocessing`` and the workers' preload all hold this."""
        return {_DOC_NAMES.get(f.name, f.name): getattr(self, f.name)
                for f in dataclasses.fields(self) if f.name != "storage_options"}

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None,
                  *, batch_size: int | None = None) -> FeatureSettings:
        """The settings :meth:`to_dict` wrote, or a document written before a field existed:
        ``precision`` float32, ``runtime`` tensorflow, ``calibration`` none, ``batch_size``
        the document's, else ``batch_size``, else the default (it does not change the features)."""
        calibration = doc.get("calibration")
        return cls(
            weights_key=str(doc.get("weights_sha256") or NO_WEIGHTS_YET), image_size=int(doc["image_size"]),
            pooling=str(doc["pooling"]), batch_size=int(doc.get("batch_size") or batch_size or DEFAULT_BATCH_SIZE),
            precision=str(doc.get("precision") or "float32"), storage_options=dict(storage_options or {}),
            runtime=str(doc.get("runtime") or DEFAULT_RUNTIME), calibration=None if calibration is None else str(calibration),
        )

    def to_json(self) -> str:
        """:meth:`to_dict` as one JSON string (a worker's ``preload_argv``: argv is no place
        for storage options, and a graph needs none)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureSettings:
        """The settings :meth:`to_json` wrote."""
        return cls.from_dict(json.loads(text))


def calibration_digest(calibration: str) -> str:
    """The digest of a ``calibration`` field: the ``digest`` of its JSON, or the field itself
    when it is a bare digest."""
    return str(json.loads(calibration)["digest"]) if calibration.startswith("{") else calibration


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Difference:
    """One field in which two settings differ so that their features cannot be mixed."""

    field: str  # a name of FEATURE_FIELDS, as documents spell it (weights_sha256)
    expected: object
    given: object

    def reason(self, expected_in: str) -> str:
        """``image size 64 (model: 32)``: the given value, and ``expected_in``'s in brackets."""
        label = self.field.replace("_", " ")
        return f"{label} {self._shown(self.given, '…')} ({expected_in}: {self._shown(self.expected, '…')})"

    def between(self, expected_in: str, given_in: str) -> str:
        """``pooling avg in the table, max in this run``."""
        return f"{self.field} {self._shown(self.expected)} {expected_in}, {self._shown(self.given)} {given_in}"

    def _shown(self, value: object, ellipsis: str = "...") -> str:
        if self.field == "calibration" and isinstance(value, str):
            return calibration_digest(value)  # the sample's digest, not its hundreds of keys
        if self.field == "weights_sha256" and value:
            return f"{str(value)[:12]}{ellipsis}"
        return repr(value) if self.field == "pooling" and ellipsis == "…" else str(value)


def differences(expected: FeatureSettings, given: FeatureSettings) -> list[Difference]:
    """Why features made with ``given`` cannot be mixed with (or fed to a model of) those of
    ``expected``: one :class:`Difference` per field of :data:`FEATURE_FIELDS` that differs,
    empty when they are compatible. The batch size and the storage options never count."""
    return [Difference(_DOC_NAMES.get(name, name), getattr(expected, name), getattr(given, name))
            for name in FEATURE_FIELDS if getattr(expected, name) != getattr(given, name)]
