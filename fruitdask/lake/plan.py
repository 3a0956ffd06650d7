"""The diff of the input against the table: what this run featurizes, rewrites and removes.

The listing is streamed (:func:`fruitdask.storage.iter_images`) into a spill file on the
client's disk while only hashes stay in memory: 16 bytes of key hash and 8 of version hash
per listed image, and per table row 16 + 8 bytes plus its file and row numbers (8 bytes).
The diff is a sort and a binary search over those arrays; the images to featurize are then
copied from the spill file into the run's manifest, one row group per partition. The
client's share is measured in ``benchmarks/lake_scale.py`` (docs/lake.md).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import posixpath
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from fruitdask import storage
from fruitdask.config import REMOVE_FLOOR, input_root
from fruitdask.errors import InputError, KeyCollisionError, TooManyRemovalsError
from fruitdask.lake import keys
from fruitdask.lake.table import TableState, relative
from fruitdask.schema import ERROR_COLUMNS, MANIFEST_SCHEMA, SPILL_SCHEMA, TRANSIENT_STAGES

logger = logging.getLogger(__name__)


@dataclass
class Listed:
    """The streamed listing: a spill file of accepted images (in listing order) and their
    hashes; the refused files (few) as error rows."""

    spill: str
    key_hash: np.ndarray
    version_hash: np.ndarray
    refused: pd.DataFrame
    per_label: dict[str, int]
    refused_hash: np.ndarray = field(default_factory=lambda: np.zeros(0, "S16"))  # keys of the refused files

    @property
    def n_images(self) -> int:
        return len(self.key_hash)


@dataclass
class TableKeys:
    """The table's rows as hashes, with the file and row each one lives in."""

    files: list[tuple[str, int]]  # (path relative to the table root, size in bytes)
    key_hash: np.ndarray
    version_hash: np.ndarray
    file_index: np.ndarray  # int32
    row_index: np.ndarray  # int32
    state: TableState | None = None  # to read the keys of rows back (the removal guard's message)


@dataclass
class Plan:
    """What one run does to the table (counts in ``run.json``'s ``counts``)."""

    listed: int
    added: int
    updated: int
    removed: int
    unchanged: int
    per_label: dict[str, int]
    manifest_url: str | None
    part_sizes: list[int]
    rewrite: list[tuple[str, int, np.ndarray]]  # (file, size, rows to drop): files kept in part
    drop: list[tuple[str, int]]  # files removed whole
    keep: list[tuple[str, int]]  # files untouched
    errors: pd.DataFrame  # refused at listing + earlier failures still current
    rows_kept: int = 0  # rows of the untouched files
    #: Key hashes of every row the new version may hold (kept rows and rows to featurize): the
    #: commit refuses a version with a key twice (lake.table.commit).
    row_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, "S16"))
    extra: dict = field(default_factory=dict)

    @property
    def featurize(self) -> int:
        return sum(self.part_sizes)

    @property
    def changes_table(self) -> bool:
        return bool(self.featurize or self.rewrite or self.drop)


def list_input(url: str, storage_options: Mapping[str, Any] | None, max_file_bytes: int | None, spill_dir: str,
               run_id: str) -> Listed:
    """Stream the listing of ``url`` into a spill file in ``spill_dir``; keep hashes only.

    Keys are the listed paths relative to the normalised root (:func:`keys.image_key`), so
    that they never depend on how ``url`` was spelled.

    Raises
    ------
    KeyCollisionError
        Two listed files have the same key (nothing is written by then).
    """
    spill = os.path.join(spill_dir, "listing.parquet")
    root = input_root(url)
    key_hash, version_hash = Growing("S16"), Growing("<u8")
    refused: list[pd.DataFrame] = []
    per_label: Counter[str] = Counter()
    with pq.ParquetWriter(spill, SPILL_SCHEMA) as writer:
        for batch in storage.iter_images(url, storage_options, max_file_bytes):
            if batch.images:
                paths, labels, sizes, tags = zip(*batch.images, strict=True)
                ks = [keys.image_key(root, p) for p in paths]
                vs = [keys.source_version(s, t) for s, t in zip(sizes, tags, strict=True)]
                writer.write_table(pa.table([list(paths), list(labels), ks, vs], schema=SPILL_SCHEMA))
                key_hash.extend(keys.hash_keys(ks))
                version_hash.extend(keys.hash_versions(vs))
                per_label.update(labels)
            refused.extend((p, lab, "list", why, keys.image_key(root, p), keys.source_version(s, t), run_id)
                           for p, lab, why, s, t in batch.refused)
    if not len(key_hash) and not refused:
        raise InputError(f"no images found under {url!r}: expected <Label>/<image>.jpg|.jpeg|.png files (any letter case)")
    release_arrow_memory()
    refused_df = pd.DataFrame(refused, columns=ERROR_COLUMNS)
    listed = Listed(spill, key_hash.array(), version_hash.array(), refused_df, dict(sorted(per_label.items())),
                    keys.hash_keys(refused_df["image_key"].tolist()))
    check_collisions(listed, root)
    return listed


def check_collisions(listed: Listed, root: str) -> None:
    """Refuse a listing in which two files have the same key (a store that lists an object
    twice, a key scheme that folds two names into one): the table holds one row per key, so
    one of them would silently replace the other. The paths are looked up only then."""
    dup = keys.duplicated(np.concatenate([listed.key_hash, listed.refused_hash]))
    if not len(dup):
        return
    first = dup[:1]
    paths = [p for p, k in zip(listed.refused["path"], listed.refused_hash, strict=True) if k == first[0]]
    spilled = pq.ParquetFile(listed.spill)
    for g in range(spilled.num_row_groups):
        t = spilled.read_row_group(g, columns=["path", "image_key"])
        hit = np.isin(keys.hash_keys(t.column("image_key").to_pylist()), first)
        paths += [p for p, h in zip(t.column("path").to_pylist(), hit, strict=True) if h]
    key = keys.image_key(root, paths[0]) if paths else "?"
    raise KeyCollisionError(
        f"{len(dup)} image key(s) would name two listed files under {root!r}, first {key!r}: "
        f"{' and '.join(repr(p) for p in paths[:2])}: nothing was written; rename or remove one of the two files "
        f"(the table holds one row per key)"
    )


class Growing:
    """An array appended to in place: grown by half again when full, by ``realloc`` (no second
    copy alive at once, unlike collecting parts and concatenating them)."""

    def __init__(self, dtype: str, capacity: int = 1 << 16) -> None:
        self.data, self.n = np.zeros(capacity, dtype), 0

    def __len__(self) -> int:
        return self.n

    def extend(self, values: np.ndarray) -> None:
        end = self.n + len(values)
        if end > len(self.data):
            self.data.resize(max(end, len(self.data) * 3 // 2), refcheck=False)
        self.data[self.n : end] = values
        self.n = end

    def array(self) -> np.ndarray:
        """The values, the buffer trimmed to them (in place)."""
        self.data.resize(self.n, refcheck=False)
        return self.data


def release_arrow_memory() -> None:
    """Hand Arrow's freed memory back to the system: its allocator keeps what a phase freed
    (tens of MB after a listing or the table's keys) for later use, which the plan never has."""
    pa.default_memory_pool().release_unused()


def table_keys(state: TableState) -> TableKeys:
    """Hashes of the table's keys and versions, file by file (two string columns read),
    into arrays sized once from the files' row counts (no concatenation copy)."""
    if not state.exists:
        return TableKeys([], np.zeros(0, "S16"), np.zeros(0, "<u8"), np.zeros(0, np.int32), np.zeros(0, np.int32))
    actions = pa.table(state.table.get_add_actions(flatten=True))
    sizes = dict(zip(actions.column("path").to_pylist(), actions.column("size_bytes").to_pylist(), strict=True))
    counts = actions.column("num_records").to_pylist() if "num_records" in actions.column_names else []
    total = sum(int(c) for c in counts) if counts and None not in counts else None
    out = TableKeys([], *_empty(total or 0), state=state)
    at = 0
    for i, fragment in enumerate(state.dataset().get_fragments()):
        rel = relative(state, fragment.path)
        out.files.append((rel, int(sizes.get(rel, 0) or 0)))
        t = fragment.to_table(columns=["image_key", "source_version"])
        if total is None or at + t.num_rows > len(out.key_hash):  # no row counts: grow (rare)
            out = _grown(out, at + t.num_rows)
        end = at + t.num_rows
        out.key_hash[at:end] = keys.hash_keys(t.column("image_key").to_numpy(zero_copy_only=False))
        out.version_hash[at:end] = keys.hash_versions(t.column("source_version").to_numpy(zero_copy_only=False))
        out.file_index[at:end] = i
        out.row_index[at:end] = np.arange(t.num_rows, dtype=np.int32)
        at = end
    release_arrow_memory()
    return _grown(out, at) if at != len(out.key_hash) else out


def _empty(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return np.zeros(n, "S16"), np.zeros(n, "<u8"), np.zeros(n, np.int32), np.zeros(n, np.int32)


def _grown(t: TableKeys, n: int) -> TableKeys:
    """The same arrays resized to ``n`` rows (kept rows first)."""
    arrays = _empty(n)
    k = min(n, len(t.key_hash))
    for new, old in zip(arrays, (t.key_hash, t.version_hash, t.file_index, t.row_index), strict=True):
        new[:k] = old[:k]
    return TableKeys(t.files, *arrays, state=t.state)


@dataclass
class Diff:
    todo: np.ndarray  # bool over the listing: featurize
    changed: np.ndarray  # bool over the listing: in the table with another version
    added: int
    updated: int
    unchanged: int
    drop_rows: np.ndarray  # bool over the table rows: leave the table
    removed: int
    gone: np.ndarray | None = None  # bool over the table rows: their images are not listed


#: Listed images compared at a time: the diff's temporaries stay a chunk's size, not the lake's.
DIFF_CHUNK = 1 << 18


def sort_table(table: TableKeys) -> None:
    """Sort the table's arrays by key hash, in place (one array copied at a time)."""
    order = np.argsort(table.key_hash, kind="stable")
    for name in ("key_hash", "version_hash", "file_index", "row_index"):
        setattr(table, name, getattr(table, name)[order])


def diff(listed: Listed, table: TableKeys, prior_errors: pd.DataFrame, *, keep_deleted: bool, rebuild: bool) -> tuple[Diff, pd.DataFrame]:
    """Compare the listing with the table (and earlier failures); return the diff and the
    earlier error rows that still hold (same file version, a failure that would repeat).

    The table's arrays are sorted in place, then the listing is looked up chunk by chunk
    (binary search), so that the temporaries stay bounded whatever the lake's size."""
    n, m = listed.n_images, len(table.key_hash)
    sort_table(table)
    found, changed = np.zeros(n, bool), np.zeros(n, bool)
    in_listing, changed_in_table = np.zeros(m, bool), np.zeros(m, bool)
    for a in range(0, n if m else 0, DIFF_CHUNK):
        keys_ = listed.key_hash[a : a + DIFF_CHUNK]
        pos = np.minimum(np.searchsorted(table.key_hash, keys_), m - 1)
        hit = table.key_hash[pos] == keys_
        moved = hit & (table.version_hash[pos] != listed.version_hash[a : a + DIFF_CHUNK])
        found[a : a + DIFF_CHUNK], changed[a : a + DIFF_CHUNK] = hit, moved
        in_listing[pos[hit]] = True
        changed_in_table[pos[moved]] = True
    same = found & ~changed
    # A file refused by a limit (size, type, link) is there: its row stays (its error row says
    # why); and a listing that accepted nothing never removes anything.
    gone = ~in_listing & ~np.isin(table.key_hash, listed.refused_hash) if n else np.zeros(m, bool)
    todo = np.ones(n, bool) if rebuild else ~same
    if rebuild:  # every row in the table is featurized again: updated, none unchanged
        changed, same = found, np.zeros(n, bool)
    kept_errors = _still_failing(listed, prior_errors, todo)
    if len(kept_errors):
        todo &= ~np.isin(listed.key_hash, keys.hash_keys(kept_errors["image_key"].tolist()))
    drop_rows = np.ones(m, bool) if rebuild else changed_in_table | (gone if not keep_deleted else np.zeros(m, bool))
    d = Diff(todo, changed, int((~found).sum()), int(changed.sum()), int(same.sum()), drop_rows,
             int(gone.sum()) if not keep_deleted or rebuild else 0, gone)
    return d, kept_errors


def _still_failing(listed: Listed, prior: pd.DataFrame, todo: np.ndarray) -> pd.DataFrame:
    """Earlier failures of files listed again unchanged, whose failure would repeat: they are
    reported again, not retried. A changed file, or a storage hiccup (stage ``read``), is retried."""
    if prior is None or not len(prior):
        return pd.DataFrame(columns=ERROR_COLUMNS)
    prior = prior[~prior["stage"].isin(TRANSIENT_STAGES | {"list"})]
    if not len(prior):
        return pd.DataFrame(columns=ERROR_COLUMNS)
    pk, pv = keys.hash_keys(prior["image_key"].tolist()), keys.hash_versions(prior["source_version"].tolist())
    listed_pairs = pd.Index(zip(listed.key_hash[todo].tolist(), listed.version_hash[todo].tolist(), strict=True))
    hit = pd.Index(zip(pk.tolist(), pv.tolist(), strict=True)).isin(listed_pairs)
    return prior[hit].reset_index(drop=True)


def write_manifest(listed: Listed, todo: np.ndarray, updated: np.ndarray, url: str,
                   storage_options: Mapping[str, Any] | None, part_size: int) -> list[int]:
    """Copy the rows to featurize from the spill file into the manifest at ``url``, one row
    group of about ``part_size`` rows per partition, each row marked ``added`` or
    ``updated``; return the partitions' sizes."""
    total = int(todo.sum())
    if not total:
        return []
    parts = max(1, -(-total // part_size))
    bounds = np.linspace(0, total, parts + 1).round().astype(int)
    sizes = [int(b - a) for a, b in itertools.pairwise(bounds) if b > a]
    fs, path = storage.get_fs(url, storage_options)
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    start, buffered, group = 0, [], 0
    with fs.open(path, "wb") as f, pq.ParquetWriter(f, MANIFEST_SCHEMA) as writer:
        spilled = pq.ParquetFile(listed.spill)
        for g in range(spilled.num_row_groups):  # a listing page each (iter_batches reads ahead: O(N))
            batch = spilled.read_row_group(g)
            mask = todo[start : start + batch.num_rows]
            change = np.where(updated[start : start + batch.num_rows][mask], "updated", "added")
            start += batch.num_rows
            if mask.any():
                chosen = batch.filter(pa.array(mask))
                buffered.append(chosen.append_column("change", pa.array(change, pa.string())))
            while group < len(sizes) and sum(t.num_rows for t in buffered) >= sizes[group]:
                table = pa.concat_tables(buffered)
                writer.write_table(table.slice(0, sizes[group]), row_group_size=sizes[group])
                buffered, group = [table.slice(sizes[group])], group + 1
    return sizes


def file_actions(table: TableKeys, drop_rows: np.ndarray) -> tuple[list, list, list, int]:
    """Per table file: rewrite (some rows leave), drop (all rows leave) or keep; and the
    rows of the kept files."""
    rewrite, drop, keep, kept_rows = [], [], [], 0
    counts = np.bincount(table.file_index, minlength=len(table.files))
    dropped = np.bincount(table.file_index[drop_rows], minlength=len(table.files))
    for i, (path, size) in enumerate(table.files):
        if dropped[i] == 0:
            keep.append((path, size))
            kept_rows += int(counts[i])
        elif dropped[i] == counts[i]:
            drop.append((path, size))
        else:
            rows = np.sort(table.row_index[drop_rows & (table.file_index == i)])
            rewrite.append((path, size, rows))
    return rewrite, drop, keep, kept_rows


def check_removals(d: Diff, table: TableKeys, max_fraction: float | None) -> None:
    """Refuse a diff that removes more than ``max_fraction`` of the table's rows and more than
    :data:`~fruitdask.config.REMOVE_FLOOR` rows (``--max-remove-fraction``): a listing that
    sees a third of the lake (a wrong prefix, label folders moved away, a store that answered
    partly) must not commit the removal of everything it did not see."""
    m = len(table.key_hash)
    allowed = m if max_fraction is None else max(REMOVE_FLOOR, math.floor(max_fraction * m))
    if d.removed <= allowed:
        return
    folders = missing_folders(table, d.gone) if d.gone is not None else []
    shown = ", ".join(repr(f) for f in folders[:3]) + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")
    raise TooManyRemovalsError(
        f"this run would remove {d.removed} of the table's {m} rows ({100 * d.removed / m:.0f} %), more than "
        f"--max-remove-fraction {max_fraction:g} allows ({allowed}); not listed: {shown}: nothing was removed or "
        f"written; check --input, or pass --max-remove-fraction 1 if they were deleted on purpose (--keep-deleted "
        f"keeps their rows)"
    )


def missing_folders(table: TableKeys, gone: np.ndarray) -> list[str]:
    """The folders (relative to the input root) of the rows in ``gone``, sorted: their keys
    are read back from the files that hold them (only when a removal is refused)."""
    wanted = set(np.unique(table.file_index[gone]).tolist())
    if table.state is None or not wanted:
        return []
    hashes = set(table.key_hash[gone].tolist())
    folders: set[str] = set()
    for i, fragment in enumerate(table.state.dataset().get_fragments()):
        if i in wanted:
            names = fragment.to_table(columns=["image_key"]).column("image_key").to_pylist()
            folders.update(posixpath.dirname(k) + "/" for k, h in zip(names, keys.hash_keys(names).tolist(), strict=True)
                           if h in hashes)
    return sorted(folders)


def make_plan(listed: Listed, table: TableKeys, prior_errors: pd.DataFrame, *, manifest_url: str,
              storage_options: Mapping[str, Any] | None, part_size: int, keep_deleted: bool, rebuild: bool,
              max_remove_fraction: float | None = None) -> Plan:
    """The diff turned into a plan: the removal guard passed (:func:`check_removals`), the
    manifest written, the files sorted by fate."""
    d, kept = diff(listed, table, prior_errors, keep_deleted=keep_deleted, rebuild=rebuild)
    check_removals(d, table, max_remove_fraction)
    sizes = write_manifest(listed, d.todo, d.changed, manifest_url, storage_options, part_size)
    rewrite, drop, keep, kept_rows = file_actions(table, d.drop_rows)
    errors = pd.concat([listed.refused, kept], ignore_index=True) if len(kept) else listed.refused
    return Plan(
        listed=listed.n_images + len(listed.refused), added=d.added, updated=d.updated, removed=d.removed,
        unchanged=d.unchanged, per_label=listed.per_label, manifest_url=manifest_url if sizes else None,
        part_sizes=sizes, rewrite=rewrite, drop=drop, keep=keep, errors=errors, rows_kept=kept_rows,
        row_keys=np.concatenate([table.key_hash[~d.drop_rows], listed.key_hash[d.todo]]),
    )


def spill_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="fruitdask-listing-")
