"""Re-keying a table whose keys are not the paths relative to the input root, once.

Before keys were computed against the normalised input root (:func:`fruitdask.config.input_root`),
a run given a relative ``--input`` keyed every image by its file name: two images of one name
in two label folders shared a key, and each later run lost rows. Every commit now records
what its keys mean (``keys``: :data:`fruitdask.lake.keys.KEYS_FORMAT`) and the root they are
relative to (``key_root``). A table without them (written before), or keyed against another
root, is re-keyed by the next run before it lists, in **one** commit of its own, without
featurizing anything (the features do not depend on the key):

- each row's key is recomputed from its ``path`` column (the path it was read from) relative
  to this run's root; a row whose path is not under the root keeps its key;
- rows that end up with the same key (the same image held twice by a damaged table) are
  reduced to one: the row whose old key was already right, else the first in file order;
- only the files with a changed key or a dropped row are rewritten (on the client, a file
  at a time), the others stay; the commit carries ``counts.rekeyed`` and
  ``counts.duplicates_dropped`` and passes the unique-key check like any other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from fruitdask import storage
from fruitdask.lake import keys, tasks
from fruitdask.lake import table as delta
from fruitdask.lake.actions import FileAction

logger = logging.getLogger(__name__)


@dataclass
class Rekeyed:
    """What a re-keying did: rows whose key changed, duplicated rows dropped, the versions."""

    rekeyed: int = 0
    duplicates_dropped: int = 0
    version_before: int | None = None
    version_after: int | None = None


@dataclass
class _FileKeys:
    rel: str
    size: int
    new_hash: np.ndarray  # S16 per row: the hash of its new key
    right: np.ndarray  # bool per row: its key was right already
    keep: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def rewrite(self) -> bool:
        return not (self.right.all() and self.keep.all())


def needs_rekey(state: delta.TableState, root: str) -> bool:
    """Whether the table's last commit does not vouch for keys relative to ``root``."""
    meta = state.meta
    return state.exists and not (meta.get("keys") == keys.KEYS_FORMAT and meta.get("key_root") == root)


def _recomputed(root: str, table: pa.Table) -> list[str]:
    """The keys of ``table``'s rows recomputed from their ``path`` (kept when not under ``root``)."""
    return [keys.relative_key(root, p) or k
            for k, p in zip(table.column("image_key").to_pylist(), table.column("path").to_pylist(), strict=True)]


def _new_keys(state: delta.TableState, root: str) -> list[_FileKeys]:
    """Each file's keys recomputed from its ``path`` column (two string columns read per file;
    only their hashes are kept: 17 bytes per row)."""
    out = []
    actions = pa.table(state.table.get_add_actions(flatten=True))
    sizes = dict(zip(actions.column("path").to_pylist(), actions.column("size_bytes").to_pylist(), strict=True))
    for fragment in state.dataset().get_fragments():
        rel = delta.relative(state, fragment.path)
        t = fragment.to_table(columns=["image_key", "path"])
        old, new = t.column("image_key").to_pylist(), _recomputed(root, t)
        out.append(_FileKeys(rel, int(sizes.get(rel, 0) or 0), keys.hash_keys(new),
                             np.array([a == b for a, b in zip(old, new, strict=True)], bool)))
    return out


def _keep_one_per_key(files: list[_FileKeys]) -> tuple[np.ndarray, int]:
    """Mark in each file's ``keep`` the rows that stay (one per key: a row whose key was right
    first, then file order); return the kept rows' key hashes and the rows dropped."""
    hashes = np.concatenate([f.new_hash for f in files]) if files else np.zeros(0, "S16")
    right = np.concatenate([f.right for f in files]) if files else np.zeros(0, bool)
    order = np.lexsort((np.arange(len(hashes)), ~right, hashes))
    first = np.ones(len(order), bool)
    first[1:] = hashes[order][1:] != hashes[order][:-1]
    keep = np.zeros(len(hashes), bool)
    keep[order[first]] = True
    at = 0
    for f in files:
        f.keep = keep[at : at + len(f.new_hash)]
        at += len(f.new_hash)
    return hashes[keep], int((~keep).sum())


def rekey(state: delta.TableState, root: str, sink: tasks.Sink, before_commit: Callable[[], None]) -> Rekeyed:
    """Re-key the table at ``state`` against ``root`` in one commit when its keys are not
    relative to it (see the module's docstring); return what was done (nothing when the keys
    are right already: no commit then)."""
    if not needs_rekey(state, root):
        return Rekeyed()
    files = _new_keys(state, root)
    row_keys, dropped = _keep_one_per_key(files)
    changed = sum(int((~f.right & f.keep).sum()) for f in files)  # rows that stay, under a new key
    if not changed and not dropped:
        return Rekeyed()  # right already (an absolute --input before): the next commit records it
    adds: list[FileAction] = []
    removes: list[FileAction] = []
    try:
        for i, f in enumerate(files):
            if f.rewrite:
                removes.append(FileAction(f.rel, f.size))
                table = tasks.read_file(sink, f.rel)
                table = table.set_column(table.schema.get_field_index("image_key"), "image_key",
                                         pa.array(_recomputed(root, table), pa.string())).filter(pa.array(f.keep))
                if table.num_rows:
                    adds.append(tasks.write_file(table, sink, f"part-{sink.run_id}-k{i:05d}.parquet"))
        counts = {"rekeyed": changed, "duplicates_dropped": dropped}
        meta = {**state.meta, "run_id": sink.run_id, "operation": "rekey", "keys": keys.KEYS_FORMAT, "key_root": root,
                "rows": len(row_keys), "counts": counts}
        before_commit()
        version = delta.commit(state, adds, removes, meta, row_keys=row_keys)
    except BaseException:
        for a in adds:  # written a moment ago, in no version
            storage.remove_prefix(sink.file_url(a.path), sink.storage_options)
        raise
    logger.info("re-keyed the table (version %s -> %s): %d rows keyed by their path relative to %s, %d duplicated "
                "rows dropped, %d files rewritten; nothing featurized (older tables were keyed against --input as "
                "typed)", state.version, version, changed, root, dropped, len(removes))
    return Rekeyed(changed, dropped, state.version, version)
