"""Stable image keys, source versions and settings fingerprints, and their compact hashes.

The diff of a listing against the table compares 16-byte key hashes and 8-byte version
hashes (``pandas.util.hash_array`` under two hash keys: 128 bits per key), never Python
strings: the client holds a few dozen bytes per image, whatever the lake's size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from fruitdask.errors import InputError
from fruitdask.features.settings import FeatureSettings

#: Bumped when the table's layout or the meaning of its columns changes.
TABLE_FORMAT = 1
#: What ``image_key`` means, recorded in every commit (``keys``) with the root (``key_root``):
#: 2 is "the path relative to the normalised input root" (tables without it are re-keyed once,
#: :mod:`fruitdask.lake.rekey`). Not part of the settings fingerprint: the features do not change.
KEYS_FORMAT = 2
_KEY_A, _KEY_B = "fruitdask-key-a0", "fruitdask-key-b1"  # hash_array wants 16 characters


def relative_key(root: str, path: str) -> str | None:
    """``path`` relative to the input ``root``, or ``None`` when ``path`` does not lie under it.
    ``root`` is normalised by the caller, once per listing (:func:`fruitdask.config.input_root`:
    a real path costs system calls)."""
    base, bare = _bare(root).rstrip("/"), _bare(path)
    return bare[len(base) + 1 :] if bare.startswith(base + "/") and len(bare) > len(base) + 1 else None


def image_key(root: str, path: str) -> str:
    """The image's key: its path relative to the input root (``Apple Braeburn/r_1_100.jpg``),
    stable across runs and readable, the same on every storage, whatever the spelling of the
    root (``T``, ``./T/``, ``/abs/T``, a link to it; ``s3a://b/T/`` and ``s3://b/T``), once
    ``root`` is normalised by :func:`fruitdask.config.input_root`.

    Raises
    ------
    InputError
        ``path`` is not under ``root``: there is no key for it (never a file-name fallback,
        which gave two images of one name the same key).
    """
    key = relative_key(root, path)
    if key is None:
        raise InputError(f"listed file {path!r} is not under the input root {root!r}: it has no key; "
                         f"report this listing (the input is read from its root only)")
    return key


def _bare(url: str) -> str:
    """A URL without its protocol (``s3a://b/k`` and ``s3://b/k`` name the same object)."""
    return url.split("://", 1)[1] if "://" in url else url


def source_version(size: int | None, tag: object) -> str:
    """``<size>:<ETag>`` on S3, ``<size>:<mtime_ns>`` locally: what changes when the file does."""
    size_text = "" if size is None else str(int(size))
    tag_text = "" if tag is None else str(tag).strip('"')
    return f"{size_text}:{tag_text}"


def settings_fingerprint(settings: FeatureSettings) -> str:
    """The table's fingerprint of ``settings`` (:meth:`FeatureSettings.fingerprint` under this
    table format): what decides a feature vector, not the batch size, so that runs of other
    batch sizes update the same table."""
    return settings.fingerprint(f"table-v{TABLE_FORMAT}")


def hash_keys(values: Sequence[str] | np.ndarray) -> np.ndarray:
    """128-bit hashes of strings as a ``S16`` array (sortable, comparable)."""
    arr = np.asarray(values, dtype=object)
    out = np.empty((len(arr), 2), dtype="<u8")
    if len(arr):
        out[:, 0] = pd.util.hash_array(arr, hash_key=_KEY_A, categorize=False)
        out[:, 1] = pd.util.hash_array(arr, hash_key=_KEY_B, categorize=False)
    return out.view("S16").reshape(len(arr))


def duplicated(key_hash: np.ndarray) -> np.ndarray:
    """The hashes that occur more than once in ``key_hash`` (sorted, each once)."""
    if len(key_hash) < 2:
        return key_hash[:0]
    s = np.sort(key_hash)
    return np.unique(s[1:][s[1:] == s[:-1]])


def hash_versions(values: Sequence[str] | np.ndarray) -> np.ndarray:
    """64-bit hashes of source versions (compared only between rows of the same key)."""
    arr = np.asarray(values, dtype=object)
    return pd.util.hash_array(arr, hash_key=_KEY_A, categorize=False) if len(arr) else np.zeros(0, "<u8")
