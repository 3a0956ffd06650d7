"""VGG16 weights files read without TensorFlow, and the recipe workers load them from.

The client only needs the arrays of a weights file (to check their shapes and hash them),
not a Keras model: importing TensorFlow and building VGG16 for that cost seconds at the
start of every run. :func:`read_weights` reads the three formats users have with h5py
(and zipfile) alone, in the order ``keras.applications.VGG16(include_top=False)
.get_weights()`` returns them:

- ``.weights.h5`` (Keras 3 ``model.save_weights``): ``layers/<name>/vars/<i>``, the layers
  named ``conv2d``, ``conv2d_1``, ... in graph order (the suffix counts, not the text order);
- ``.h5`` (Keras 2 / the ImageNet no-top file Keras downloads): root attribute
  ``layer_names``, each layer's ``weight_names`` in order;
- ``.keras`` (Keras 3 ``model.save``): a zip holding a ``model.weights.h5`` of the first kind;
- ``.npz`` (what fruitdask stages for workers): ``arr_0 ... arr_25``.

:class:`WeightsSource` is the one type the weights travel as, from the backend that prepares
them to the model a worker builds (:func:`fruitdask.features.model.cached_runtime`): a digest and
a ``load()``. :class:`WeightsFile` is what a Dask task carries instead of the arrays: a small,
picklable recipe (a file URL and its digest). A worker loads the file the first time it
builds its model, so the weights reach each worker once, and a worker that joins late or
replaces a dead one loads them the same way: nothing the run needs lives only in a worker's
memory. :class:`WeightsArrays` holds arrays already in memory (a classifier bundle, a test);
the Spark backend's broadcast is a third kind (``backends/spark/backend.py``).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import re
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fruitdask.errors import WeightsError

logger = logging.getLogger(__name__)

#: File names :func:`read_weights` understands.
WEIGHTS_SUFFIXES = (".weights.h5", ".h5", ".keras", ".npz")


def _suffix_index(name: str) -> int:
    """``conv2d`` -> 0, ``conv2d_12`` -> 12: Keras 3's order of same-class layers."""
    m = re.search(r"_(\d+)$", name)
    return int(m.group(1)) if m else 0


def _read_keras3(f) -> list[np.ndarray]:
    layers = f["layers"]
    out: list[np.ndarray] = []
    names = sorted(layers, key=lambda n: (re.sub(r"_\d+$", "", n), _suffix_index(n)))
    for name in names:
        group = layers[name].get("vars")
        if group is None or not len(group):
            continue
        out.extend(np.asarray(group[k]) for k in sorted(group, key=int))
    return out


def _read_legacy(group) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for raw in group.attrs["layer_names"]:
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        for wraw in group[name].attrs.get("weight_names", []):
            wname = wraw.decode() if isinstance(wraw, bytes) else str(wraw)
            out.append(np.asarray(group[name][wname]))
    return out


def read_h5(source) -> list[np.ndarray]:
    """Arrays of a Keras weights HDF5 file (path or binary file object), in Keras order."""
    import h5py

    with h5py.File(source, "r") as f:
        if "layers" in f:
            return _read_keras3(f)
        if "layer_names" in f.attrs:
            return _read_legacy(f)
        if "model_weights" in f:  # a whole model saved as .h5 by Keras 2
            return _read_legacy(f["model_weights"])
    raise ValueError("no Keras weights layout found (neither layers/ nor layer_names)")


def read_weights_bytes(name: str, data: bytes) -> list[np.ndarray]:
    """Arrays of a weights file named ``name`` (which decides the format) from its bytes."""
    if name.endswith(".npz"):
        with np.load(io.BytesIO(data)) as z:
            return [z[f"arr_{i}"] for i in range(len(z.files))]
    if name.endswith(".keras"):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return read_h5(io.BytesIO(z.read("model.weights.h5")))
    if name.endswith(".h5"):
        return read_h5(io.BytesIO(data))
    raise ValueError(f"unknown weights format {name!r}: use one of {', '.join(WEIGHTS_SUFFIXES)}")


def read_weights(url: str, storage_options: Mapping[str, Any] | None = None) -> list[np.ndarray]:
    """Read a weights file from a path or URI (through :mod:`fruitdask.storage`), no TensorFlow."""
    from fruitdask import storage

    name = posixpath.basename(url.rstrip("/"))
    if not storage.is_remote(url) and name.endswith(".h5"):
        return read_h5(url)  # h5py reads only the datasets, not the whole file into memory
    with tempfile.TemporaryDirectory(prefix="fruitdask-weights-") as tmp:
        local = storage.download_to_local(url, os.path.join(tmp, name), storage_options)
        with open(local, "rb") as fh:
            data = fh.read()
    return read_weights_bytes(name, data)


def npz_bytes(weights: list[np.ndarray]) -> bytes:
    """The weights as an uncompressed ``.npz`` (read back by :func:`read_weights_bytes`)."""
    buf = io.BytesIO()
    np.savez(buf, *[np.asarray(w, dtype=np.float32) for w in weights])
    return buf.getvalue()


def weights_digest(weights: list[np.ndarray]) -> str:
    """A content hash of the weights, to name them in caches and ``run.json``."""
    h = hashlib.sha256()
    for w in weights:
        h.update(str(w.shape).encode())
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


class WeightsSource(Protocol):
    """Where a worker gets the weights of digest ``sha256`` from; ``load()`` returns them
    (VGG16 no-top order, float32) and is called once per worker process."""

    @property
    def sha256(self) -> str: ...

    def load(self) -> list[np.ndarray]: ...


@dataclass(frozen=True, eq=False)
class WeightsArrays:
    """Weights already in memory (a classifier bundle, a benchmark, a test)."""

    arrays: tuple[np.ndarray, ...]
    sha256: str

    @classmethod
    def of(cls, weights: list[np.ndarray], sha256: str | None = None) -> WeightsArrays:
        """``weights`` with their digest (computed when not given)."""
        arrays = tuple(np.asarray(w, dtype=np.float32) for w in weights)
        return cls(arrays, sha256 or weights_digest(list(arrays)))

    def load(self) -> list[np.ndarray]:
        return list(self.arrays)


@dataclass(frozen=True)
class WeightsFile:
    """Where a worker loads the run's weights from: a file URL and the digest it must have.

    Small and picklable: it travels inside each featurize task, never the arrays.
    """

    url: str
    sha256: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> list[np.ndarray]:
        """Read the file and check it is the run's weights (a file replaced mid-run is refused)."""
        try:
            weights = [np.asarray(w, dtype=np.float32) for w in read_weights(self.url, self.storage_options)]
        except (OSError, ValueError, KeyError) as e:
            raise WeightsError(f"worker cannot read the weights file {self.url!r}: {e}") from e
        digest = weights_digest(weights)
        if digest != self.sha256:
            raise WeightsError(
                f"weights file {self.url!r} changed during the run (sha256 {digest[:12]}…, expected "
                f"{self.sha256[:12]}…): leave it in place until the run ends"
            )
        return weights
