"""The one place that talks to storage (fsspec: local paths and ``s3://``).

Everything takes ``storage_options`` explicitly so that worker processes and Spark executors
reach the same endpoint as the driver. Image bytes are only read where the work runs
(:func:`read_bytes` is called inside tasks), never while listing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pandas as pd

from fruitdask.errors import InputError, OutputError, StorageError, UntrustedReferenceError
from fruitdask.schema import SKIPPED_COLUMNS
from fruitdask.storage import lease, listing, s3errors, safety
from fruitdask.storage.regions import bucket_region, guard_regions, normalize_region, split_bucket  # noqa: F401 - re-exported
from fruitdask.storage.urls import get_fs, is_remote, unsafe_name  # is_remote re-exported too

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SUCCESS_MARKER = "_SUCCESS"


#: Default ``--max-file-mb``: a Fruits-360 image is ~5 KB, a 24-megapixel JPEG ~15 MB.
DEFAULT_MAX_FILE_MB = 50


@dataclass
class ListedBatch:
    """One folder's worth of the listing: accepted images and files refused from the listing
    alone. ``images``: ``(path, label, size, tag)``; ``refused``: ``(path, label, reason, size, tag)``."""

    images: list[tuple[str, str, int | None, str | None]]
    refused: list[tuple[str, str, str, int | None, str | None]]


def iter_images(
    url: str, storage_options: Mapping[str, Any] | None = None, max_file_bytes: int | None = None,
    threads: int = listing.LIST_THREADS,
) -> Iterator[ListedBatch]:
    """Stream the images under ``url``, recursively, with their label, a batch per folder
    listed (folders listed concurrently; nothing cached); set aside those refused from the
    listing alone, before any byte of them is read.

    The label is the name of the folder that holds the image (``Cherry 1/r_0_100.jpg`` has
    label ``Cherry 1``). Extensions ``.jpg``, ``.jpeg`` and ``.png`` match in any letter case.
    Refused: files over ``max_file_bytes`` (by the size the listing reports: one huge object
    would be read whole into a worker), and, locally, symbolic links that lead outside the
    input root (or nowhere); links inside the root are kept, linked folders not followed.

    Raises
    ------
    InputError
        ``url`` does not exist or is a file.
    """
    fs, root = get_fs(url, storage_options)
    remote = is_remote(url)
    try:
        if not fs.exists(root):
            raise InputError(f"input {url!r} does not exist: check the path, or pass --input DIR_OR_URI")
        if not fs.isdir(root):
            raise InputError(f"input {url!r} is a file, not a folder: pass the folder that holds <Label>/<image>.jpg")
        batches = listing.remote_batches(fs, root, threads) if remote else listing.local_batches(root, threads)
        for entries in batches:
            yield _accept(entries, fs, remote, max_file_bytes)
    except s3errors.storage_exceptions() as e:
        raise translate(e, url) from e


def _accept(entries: list[listing.Entry], fs: fsspec.AbstractFileSystem, remote: bool, max_file_bytes: int | None) -> ListedBatch:
    images, refused = [], []
    for path, size, tag, problem in entries:
        name = posixpath.basename(path)
        if not listing.is_linked_folder_entry((path, size, tag, problem)) and (
            name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS)
        ):
            continue
        label = listing.label_of(path)
        # Full URLs for remote files so any process can open them without the root.
        full = fs.unstrip_protocol(path) if remote else path
        problem = problem or unsafe_name(full)
        if problem is None and max_file_bytes is not None and size is not None and size > max_file_bytes:
            problem = (f"file of {size:,} bytes is over the {max_file_bytes:,}-byte limit (--max-file-mb "
                       f"{max_file_bytes / 2**20:g}): not read; raise --max-file-mb if such files are expected")
        if problem is None:
            images.append((full, label, size, tag))
        else:
            refused.append((full, label, problem, size, tag))
    return ListedBatch(images, refused)


def scan_images(
    url: str, storage_options: Mapping[str, Any] | None = None, max_file_bytes: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The whole listing of :func:`iter_images` in memory (for small trees: the classifier's
    test folders, the bench), sorted by path.

    Returns
    -------
    (listing, rejected)
        ``listing``: columns ``path`` and ``label``;
        ``rejected``: ``path, label, stage, reason`` (stage ``list``), for ``errors.parquet``.
    """
    rows, rejected = [], []
    for batch in iter_images(url, storage_options, max_file_bytes):
        rows.extend((p, lab) for p, lab, _, _ in batch.images)
        rejected.extend((p, lab, "list", reason) for p, lab, reason, _, _ in batch.refused)
    if not rows and not rejected:
        raise InputError(
            f"no images found under {url!r}: expected <Label>/<image>.jpg|.jpeg|.png files (any letter case)"
        )
    listing_df = pd.DataFrame(sorted(rows), columns=["path", "label"])
    return listing_df, pd.DataFrame(sorted(rejected), columns=SKIPPED_COLUMNS)


def list_images(
    url: str, storage_options: Mapping[str, Any] | None = None, max_file_bytes: int | None = None
) -> pd.DataFrame:
    """The accepted images of :func:`scan_images` (refused ones are logged as warnings).

    Raises
    ------
    InputError
        No image under ``url`` (or every one was refused).
    """
    listing, rejected = scan_images(url, storage_options, max_file_bytes)
    for row in rejected.itertuples():
        logger.warning("skipped %s: %s", row.path, row.reason)
    if listing.empty:
        raise InputError(f"every image under {url!r} was refused ({len(rejected)}; first: {rejected['reason'].iloc[0]})")
    return listing


def read_bytes(path: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """Read one whole file. Called inside tasks, on the worker that featurizes it.

    An ``OSError`` (missing file, access denied to one object) propagates as is, for the
    caller to record against that image; failures that doom every read of the run (no
    credentials, endpoint unreachable) become a :class:`StorageError` that fails the run.
    ``path`` is read as itself: a name the file system would parse into another object's
    (``k?versionId=v`` on S3) is an ``OSError``, never that object's bytes.
    """
    problem = unsafe_name(path)
    if problem is not None:
        raise OSError(f"{path}: {problem}")
    fs, p = get_fs(path, storage_options)
    try:
        with fs.open(p, "rb") as f:
            return f.read()
    except OSError:
        raise
    except s3errors.storage_exceptions() as e:
        raise translate(e, path) from e


def check_protocols(urls: list[str | None], what: str = "location", fix: str = "copy it to a local path or an s3:// bucket in an allowed region") -> None:
    """Refuse locations other than local paths and ``s3://`` (whose region the guard can
    check): for locations read from stored data (weights references, thumbnail paths), which
    must never become a way to reach http(s) or any other fsspec protocol."""
    for url in urls:
        if url and is_remote(url) and fsspec.core.split_protocol(url)[0] not in ("s3", "s3a"):
            raise UntrustedReferenceError(
                f"{what} {url!r} uses {fsspec.core.split_protocol(url)[0]}://, which fruitdask does not read: {fix}"
            )


def translate(e: BaseException, url: str) -> StorageError | InputError:
    """Map a storage exception to a fruitdask error that says what to do (see
    :mod:`fruitdask.s3errors`)."""
    return s3errors.explain(e, url)


def join(url: str, *parts: str) -> str:
    """Join URL parts with ``/`` whatever the protocol."""
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


@dataclass
class OutputTarget:
    """A run's output location, written through a temporary prefix and committed last.

    Everything is written under :attr:`staging`, a sibling ``.<name>.fruitdask-tmp-<run_id>``
    of the target. :meth:`commit` publishes it and ``_SUCCESS`` appears last, so a reader
    that waits for the marker never sees a half-written dataset; :meth:`abort` removes the
    staging prefix. The protocol per storage:

    - local: the marker is written into staging, an old target is renamed aside, staging is
      renamed onto the target (atomic), then the old one is deleted. A failure puts the old
      target back.
    - S3 (no rename): the old target is first copied aside, server-side, to
      ``.<name>.fruitdask-old-<run_id>`` (``_SUCCESS`` included, so the copy is a complete
      dataset); then the target's ``_SUCCESS`` is deleted, then its other objects (old and
      new files never mix), staging objects are copied in, ``_SUCCESS`` is written, and the
      copy aside and staging are deleted. A failure while copying deletes what was copied
      and puts the old dataset back from the copy aside.

    Only one run writes a target at a time: :func:`committed` takes a lock object
    ``.<name>.fruitdask-lock`` beside it (with the run id), a lease of ``lease_ttl`` seconds
    that a heartbeat thread renews while the run lives (a dead run's lock is taken over once
    its lease runs out), :meth:`commit` checks it is still this run's, and the lock goes when
    the run ends. ``--overwrite`` only replaces a
    fruitdask output (``_SUCCESS``, ``run.json`` or ``bundle.json`` at its top).
    """

    url: str
    storage_options: Mapping[str, Any]
    run_id: str
    locked: bool = field(default=False, compare=False)
    lease_ttl: float = field(default=lease.DEFAULT_TTL_S, compare=False)
    _heartbeat: lease.Heartbeat | None = field(default=None, compare=False, repr=False)

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None, overwrite: bool, run_id: str | None = None,
             lease_ttl: float = lease.DEFAULT_TTL_S) -> OutputTarget:
        """Check the target and prepare a staging prefix beside it; writes nothing.

        Raises
        ------
        OutputError
            The target exists (and ``overwrite`` is false), is a file, or is a bucket root.
        """
        target = cls(url.rstrip("/"), dict(storage_options or {}), run_id or uuid.uuid4().hex[:12], lease_ttl=lease_ttl)
        if is_remote(target.url) and "/" not in fsspec.core.split_protocol(target.url)[1].strip("/"):
            raise OutputError(
                f"--output {url!r} is a bucket root: pass a prefix inside it, such as {join(target.url, 'features/run-1')}"
            )
        fs, path = target.fs_path
        try:
            _forget_listings(fs, path)
            exists = fs.exists(path)
            if exists and not fs.isdir(path):
                raise OutputError(f"output {url!r} is a file: choose another --output (a folder or prefix)")
            entries = fs.ls(path, detail=False) if exists else []
            exists = exists and bool(entries)
            names = sorted({posixpath.basename(e.rstrip("/")) for e in entries})
            complete = exists and SUCCESS_MARKER in names
            backups = safety.leftover_backups(fs, path) if exists and not complete and is_remote(target.url) else []
        except s3errors.storage_exceptions() as e:
            raise translate(e, url) from e
        if exists and not overwrite:
            state = "" if complete else f" (incomplete: no {SUCCESS_MARKER}, left by an interrupted run?)"
            if backups:
                state += f"; the dataset it replaced is kept at {fs.unstrip_protocol(backups[-1])}"
            raise OutputError(f"output {url!r} already exists{state}: pass --overwrite to replace it, or choose another --output")
        if exists:
            safety.check_replaceable(url, names)
        return target

    @classmethod
    def for_update(cls, url: str, storage_options: Mapping[str, Any] | None, run_id: str | None = None,
                   lease_ttl: float = lease.DEFAULT_TTL_S) -> OutputTarget:
        """A target updated in place (the features table and the files beside it), with a
        staging prefix for the run's own inputs and the output's lock; writes nothing."""
        target = cls(url.rstrip("/"), dict(storage_options or {}), run_id or uuid.uuid4().hex[:12], lease_ttl=lease_ttl)
        if is_remote(target.url) and "/" not in fsspec.core.split_protocol(target.url)[1].strip("/"):
            raise OutputError(
                f"--output {url!r} is a bucket root: pass a prefix inside it, such as {join(target.url, 'features/run-1')}"
            )
        return target
    def __getstate__(self) -> dict[str, Any]:
        # The heartbeat (a thread) stays with the process that holds the lock: a copy sent
        # to a worker or executor can write staging files, never renew or release the lock.
        return {**self.__dict__, "_heartbeat": None, "locked": False}

    def remove_stale_staging(self) -> list[str]:
        """Remove the staging prefixes of runs that died on this output (called with the lock
        held: no other run can be writing one); return them."""
        parent, name = self.url.rsplit("/", 1) if "/" in self.url else (".", self.url)
        fs, p = get_fs(parent, self.storage_options)
        prefix = f".{name}.fruitdask-tmp-"
        try:
            _forget_listings(fs, p)
            stale = [e for e in fs.ls(p, detail=False) if e.rstrip("/").rsplit("/", 1)[-1].startswith(prefix)
                     and not e.rstrip("/").endswith(self.run_id)]
        except FileNotFoundError:
            return []
        except s3errors.storage_exceptions() as e:
            logger.warning("could not look for the staging of dead runs beside %s: %s", self.url, e)
            return []
        for e in stale:
            logger.info("removing %s, left by a run that died", e)
            remove_prefix(fs.unstrip_protocol(e) if is_remote(self.url) else e, self.storage_options)
        return stale

    def ensure_held(self) -> None:
        """Before a commit: renew the lease and check the lock is still this run's (a run
        that stalled past its lease and was taken over commits nothing)."""
        if self.locked:
            if self._heartbeat is not None:  # a fresh lease for the commit (a lost one fails the check)
                self._heartbeat.renew()
            lfs, lpath = get_fs(self.lock_url, self.storage_options)
            safety.check_lock(lfs, lpath, self.url, self.lock_url, self.run_id)

    @property
    def lock_url(self) -> str:
        """The lock object beside the target (never inside: the target gets replaced)."""
        return safety.sibling(self.url, ".fruitdask-lock")

    @property
    def backup(self) -> str:
        """Where an old S3 dataset is copied aside while the new one is copied in."""
        return safety.sibling(self.url, f".fruitdask-old-{self.run_id}")

    def lock(self) -> None:
        """Take the output's lock for this run (taking over a dead run's expired lease) and
        start renewing it.

        Raises
        ------
        OutputBusyError
            Another run holds it (the message names that run and when its lease runs out).
        """
        fs, path = get_fs(self.lock_url, self.storage_options)
        remote = is_remote(self.url)
        try:
            held = safety.acquire_lease(fs, path, remote, self.url, self.lock_url, self.run_id, self.lease_ttl)
        except s3errors.storage_exceptions() as e:
            raise translate(e, self.lock_url) from e
        self._heartbeat = lease.Heartbeat(fs, path, remote, held, self.lease_ttl).start()
        self.locked = True

    def unlock(self) -> None:
        """Stop renewing the lock and release it if this run holds it."""
        if self._heartbeat is not None:
            self._heartbeat.stop()
            self._heartbeat = None
        if self.locked:
            fs, path = get_fs(self.lock_url, self.storage_options)
            safety.release_lock(fs, path, self.run_id)
            self.locked = False

    @property
    def fs_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        return get_fs(self.url, self.storage_options)

    @property
    def staging(self) -> str:
        parent, name = self.url.rsplit("/", 1) if "/" in self.url else (".", self.url)
        return f"{parent}/.{name}.fruitdask-tmp-{self.run_id}"

    def staging_path(self, *parts: str) -> str:
        return join(self.staging, *parts)

    def final_path(self, *parts: str) -> str:
        return join(self.url, *parts)

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write one small file into the staging prefix; return its staging URL."""
        dest = self.staging_path(relpath)
        fs, p = get_fs(dest, self.storage_options)
        try:
            fs.makedirs(posixpath.dirname(p), exist_ok=True)
            with fs.open(p, "wb") as f:
                f.write(data)
        except s3errors.storage_exceptions() as e:
            raise translate(e, dest) from e
        return dest

    def write_json(self, relpath: str, obj: Any) -> str:
        return self.write_bytes(relpath, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def commit(self) -> None:
        """Publish staging at the target (replacing an old target); ``_SUCCESS`` comes last.

        Raises
        ------
        OutputError
            The move failed; the target holds no dataset without ``_SUCCESS`` (the old one,
            locally) and staging has been removed where possible.
        """
        fs, target = self.fs_path
        _, staging = get_fs(self.staging, self.storage_options)
        try:
            self.ensure_held()
            if is_remote(self.url):
                self._commit_copy(fs, staging, target)
            else:
                self._commit_rename(fs, staging, target)
        except s3errors.storage_exceptions() as e:
            self.abort()
            raise OutputError(f"could not commit the output to {self.url!r}: {translate(e, self.url)}") from e
        except BaseException:  # Ctrl-C or SIGTERM mid-commit: same cleanup, then unwind
            self.abort()
            raise
        logger.info("committed output to %s", self.url)

    def _commit_rename(self, fs: fsspec.AbstractFileSystem, staging: str, target: str) -> None:
        with open(os.path.join(staging, SUCCESS_MARKER), "wb"):
            pass
        old = f"{staging}.old" if os.path.lexists(target) else None
        if old and os.path.isdir(target):
            safety.check_replaceable(self.url, os.listdir(target))
        if old:
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except BaseException:
            if old:
                os.replace(old, target)
            raise
        if old:
            try:
                fs.rm(old, recursive=True)
            except OSError as e:  # committed already: a leftover must not fail the run
                logger.warning("could not remove the replaced output %s: %s", old, e)

    def _commit_copy(self, fs: fsspec.AbstractFileSystem, staging: str, target: str) -> None:
        # Other processes (workers) wrote staging: listings cached here are stale.
        _forget_listings(fs, staging)
        _forget_listings(fs, target)
        files = fs.find(staging + "/")
        if not files:
            raise OutputError(f"nothing to commit: the temporary output {self.staging!r} is empty or gone")
        marker = f"{target}/{SUCCESS_MARKER}"
        old = fs.find(target + "/")
        safety.check_replaceable(self.url, safety.top_level_names(old, target))
        _, backup = get_fs(self.backup, self.storage_options)
        # The old dataset is copied aside before anything of it is deleted: from here on it
        # is complete either at the target or at the backup (see docs/s3.md).
        backup_files = safety.copy_aside(fs, old, target, backup) if old else []
        copies = [target + p[len(staging):] for p in files]
        try:
            if marker in old:
                # First, so a reader stops trusting the old dataset before any file goes.
                fs.rm_file(marker)
            if old:
                safety.delete_checked(fs, [p for p in old if p != marker], self.url)
            fs.copy(files, copies)
            safety.check_exactly(fs, target, copies, self.url)
            fs.pipe_file(marker, b"")
        except BaseException:
            _remove_quietly(fs, [marker, *copies, *old], target)
            if backup_files:
                safety.restore(fs, backup_files, backup, target, self.backup)
            raise
        _forget_listings(fs, target)
        if backup_files:
            _remove_quietly(fs, backup_files, backup)
        _remove_quietly(fs, files, staging)

    def abort(self) -> None:
        """Remove the staging prefix; errors are logged, the original failure matters more."""
        fs, staging = get_fs(self.staging, self.storage_options)
        try:
            _forget_listings(fs, staging)
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
        except s3errors.storage_exceptions() as e:
            logger.warning("could not remove temporary output %s: %s", self.staging, e)


_forget_listings = safety.forget_listings
_remove_quietly = safety.remove_quietly


@contextmanager
def committed(target: OutputTarget) -> Iterator[OutputTarget]:
    """Lock ``target`` and yield it; commit on success, abort on any failure (including
    Ctrl-C); the lock is released either way."""
    target.lock()
    try:
        try:
            yield target
        except BaseException:
            target.abort()
            raise
        target.commit()
    finally:
        target.unlock()


def write_parquet_part(df: pd.DataFrame, url: str, schema, storage_options: Mapping[str, Any] | None) -> int:
    """Write one partition as one Parquet file with an explicit Arrow schema; return rows.

    The pandas metadata is dropped on purpose: it would name pandas' Arrow extension dtype
    (``list<item: float>[pyarrow]``), which pandas cannot parse back, while plain Arrow
    ``list<float>`` columns read as arrays in pandas, pyarrow, Spark and Athena alike.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, schema=schema, preserve_index=False).replace_schema_metadata(None)
    fs, p = get_fs(url, storage_options)
    try:
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
        with fs.open(p, "wb") as f:
            pq.write_table(table, f, compression="snappy")
    except s3errors.storage_exceptions() as e:
        # A fruitdask error travels back from the worker and reaches the CLI as one line.
        raise translate(e, url) from e
    return table.num_rows


def read_parquet(url: str, storage_options: Mapping[str, Any] | None = None, columns: list[str] | None = None) -> pd.DataFrame:
    """Read one Parquet file or a folder of part files (a run's ``features/``).

    List columns come back as Arrow-backed series (``pd.ArrowDtype``), ready for
    :func:`fruitdask.features.frames.matrix`.
    """
    import pyarrow.parquet as pq

    fs, p = get_fs(url, storage_options)
    try:
        table = pq.read_table(p, filesystem=fs, columns=columns)
    except (PermissionError, OSError) as e:
        raise translate(e, url) from e
    return table.to_pandas(types_mapper=pd.ArrowDtype)


def list_files(url: str, storage_options: Mapping[str, Any] | None = None, suffix: str = "") -> list[str]:
    """Files directly under folder ``url`` whose name ends with ``suffix``, sorted, as URLs
    (``[]`` when the folder does not exist)."""
    fs, p = get_fs(url, storage_options)
    try:
        _forget_listings(fs, p)  # other processes (workers) may have written there
        if not fs.isdir(p):
            return []
        names = sorted(f for f in fs.ls(p, detail=False) if f.endswith(suffix) and not posixpath.basename(f).startswith("."))
    except (PermissionError, OSError) as e:
        raise translate(e, url) from e
    return [fs.unstrip_protocol(f) if is_remote(url) else f for f in names]


def write_file(url: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> str:
    """Write one file in place, whole or not at all: one ``PutObject`` on S3, a temporary
    file renamed over the target locally (a reader never sees half of it)."""
    fs, p = get_fs(url, storage_options)
    try:
        fs.makedirs(posixpath.dirname(p), exist_ok=True)
        if is_remote(url):
            fs.pipe_file(p, data)
        else:
            tmp = f"{p}.{uuid.uuid4().hex[:8]}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
    except (PermissionError, OSError) as e:
        raise translate(e, url) from e
    return url


# --- checkpoints (issue 6, fruitdask/checkpoint.py) ------------------------------------


def remove_prefix(url: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Remove a folder/prefix and everything under it, if it exists; errors are logged
    (used to drop checkpoints after a commit, when failing would help nobody)."""
    fs, p = get_fs(url, storage_options)
    try:
        _forget_listings(fs, p)  # workers wrote it: a listing cached here would hide it
        if fs.exists(p):
            fs.rm(p, recursive=True)
    except s3errors.storage_exceptions() as e:
        logger.warning("could not remove %s: %s", url, e)


# --- end checkpoints -------------------------------------------------------------------


def file_sha256(path: str) -> str:
    """sha256 of a local file's bytes (a downloaded weights file, before it is loaded)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_to_local(url: str, local_path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Copy one file (e.g. a weights file on S3) to a local path and return that path."""
    fs, p = get_fs(url, storage_options)
    try:
        fs.get(p, local_path)
    except s3errors.storage_exceptions() as e:
        raise translate(e, url) from e
    return local_path

