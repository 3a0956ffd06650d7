"""An output's two lifecycles, on one lock (:class:`LockedOutput`):

- :class:`OutputTarget`, a run's output folder, updated in place: the features table commits
  its own versions into it and the run's record is published beside the table afterwards;
  the staging prefix only holds the run's own inputs and goes when the run ends.
- :class:`StagedOutput`, a dataset written whole (a model bundle): written into a staging
  prefix and published there by its commit (:mod:`fruitdask.storage.commit`), ``_SUCCESS``
  last; :func:`committed` ties lock, commit and abort to a ``with`` block.
"""

from __future__ import annotations

import json
import logging
import posixpath
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec

from fruitdask.errors import OutputError
from fruitdask.storage import commit, lease, paths, safety, stores
from fruitdask.storage.files import remove_prefix
from fruitdask.storage.stores import translate
from fruitdask.storage.urls import get_fs, is_remote

logger = logging.getLogger(__name__)


@dataclass
class LockedOutput:
    """An output location that one run writes at a time, with its staging prefix beside it.

    :meth:`lock` takes a lock object ``.<name>.fruitdask-lock`` beside the output (with the
    run id), a lease of ``lease_ttl`` seconds that a heartbeat thread renews while the run
    lives (a dead run's lock is taken over once its lease runs out, or at once when its
    process is gone from this host); it waits up to ``lock_wait`` seconds for a live holder
    (``--wait-lock``). :meth:`ensure_held` checks the lock is still this run's before
    anything is published, and :meth:`unlock` releases it. The run's staging prefix
    ``.<name>.fruitdask-tmp-<run_id>`` is a sibling of the output (:attr:`staging`);
    :meth:`abort` removes it.
    """

    url: str
    storage_options: Mapping[str, Any]
    run_id: str
    locked: bool = field(default=False, compare=False)
    lease_ttl: float = field(default=lease.DEFAULT_TTL_S, compare=False)
    lock_wait: float = field(default=0.0, compare=False)
    _heartbeat: lease.Heartbeat | None = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        # The heartbeat (a thread) stays with the process that holds the lock: a copy sent
        # to a worker or executor can write staging files, never renew or release the lock.
        return {**self.__dict__, "_heartbeat": None, "locked": False}

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
        return paths.lock_url(self.url)

    def lock(self) -> None:
        """Take the output's lock for this run (taking over a dead run's lock: its lease ran
        out, or its process is gone from this host) and start renewing it; wait up to
        :attr:`lock_wait` seconds for a live holder.

        Raises
        ------
        OutputBusyError
            Another run holds it still (the message names that run and when its lease runs out).
        """
        fs, path = get_fs(self.lock_url, self.storage_options)
        store = safety.store_of(fs)
        try:
            held = safety.acquire_lease(fs, path, store, self.url, self.lock_url, self.run_id, self.lease_ttl,
                                        self.lock_wait)
        except stores.storage_exceptions() as e:
            raise translate(e, self.lock_url) from e
        self._heartbeat = lease.Heartbeat(fs, path, store, held, self.lease_ttl).start()
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
        return paths.staging_url(self.url, self.run_id)

    def staging_path(self, *parts: str) -> str:
        return paths.join(self.staging, *parts)

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write one small file into the staging prefix; return its staging URL."""
        dest = self.staging_path(relpath)
        fs, p = get_fs(dest, self.storage_options)
        try:
            fs.makedirs(posixpath.dirname(p), exist_ok=True)
            with fs.open(p, "wb") as f:
                f.write(data)
        except stores.storage_exceptions() as e:
            raise translate(e, dest) from e
        return dest

    def write_json(self, relpath: str, obj: Any) -> str:
        return self.write_bytes(relpath, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def abort(self) -> None:
        """Remove the staging prefix; errors are logged, the original failure matters more."""
        fs, staging = get_fs(self.staging, self.storage_options)
        try:
            safety.forget_listings(fs, staging)
            if fs.exists(staging):
                fs.rm(staging, recursive=True)
        except stores.storage_exceptions() as e:
            logger.warning("could not remove temporary output %s: %s", self.staging, e)


class OutputTarget(LockedOutput):
    """A run's output folder, updated in place under the output's lock.

    Nothing is published by moving staging: the features table commits its own versions into
    the folder (:mod:`fruitdask.lake.table`), then the run's record and the files beside the
    table are written at their final paths, ``_SUCCESS`` last (:mod:`fruitdask.output`). The
    staging prefix holds only the run's own inputs (the plan's manifest, a weights copy, the
    Dask performance report) and goes when the run ends, whatever happened (:meth:`abort`);
    :meth:`remove_stale_staging` removes those of runs that died on this output.
    """

    @classmethod
    def for_update(cls, url: str, storage_options: Mapping[str, Any] | None, run_id: str | None = None,
                   lease_ttl: float = lease.DEFAULT_TTL_S, lock_wait: float = 0.0) -> OutputTarget:
        """A target updated in place (the features table and the files beside it), with a
        staging prefix for the run's own inputs and the output's lock; writes nothing."""
        target = cls(url.rstrip("/"), dict(storage_options or {}), run_id or uuid.uuid4().hex[:12], lease_ttl=lease_ttl,
                     lock_wait=lock_wait)
        _refuse_bucket_root(url, target.url)
        return target

    def remove_stale_staging(self) -> list[str]:
        """Remove the staging prefixes of runs that died on this output (called with the lock
        held: no other run can be writing one); return them."""
        fs, p = get_fs(paths.split(self.url)[0], self.storage_options)
        prefix = paths.sibling_name(self.url, paths.STAGING)
        try:
            safety.forget_listings(fs, p)
            stale = [entry for entry in fs.ls(p, detail=False) if entry.rstrip("/").rsplit("/", 1)[-1].startswith(prefix)
                     and not entry.rstrip("/").endswith(self.run_id)]
        except FileNotFoundError:
            return []
        except stores.storage_exceptions() as e:
            logger.warning("could not look for the staging of dead runs beside %s: %s", self.url, e)
            return []
        for entry in stale:
            logger.info("removing %s, left by a run that died", entry)
            remove_prefix(fs.unstrip_protocol(entry) if is_remote(self.url) else entry, self.storage_options)
        return stale

    def final_path(self, *parts: str) -> str:
        return paths.join(self.url, *parts)


class StagedOutput(LockedOutput):
    """A dataset written whole (a model bundle) through a staging prefix and committed last.

    Everything is written under :attr:`staging`; :meth:`commit` publishes it at the target and
    ``_SUCCESS`` appears last, so a reader that waits for the marker never sees a half-written
    dataset; :meth:`abort` removes the staging prefix. The protocol per storage:

    - local: the marker is written into staging, an old target is renamed aside, staging is
      renamed onto the target (atomic), then the old one is deleted. A failure puts the old
      target back.
    - S3 (no rename): the old target is first copied aside, server-side, to
      ``.<name>.fruitdask-old-<run_id>`` (``_SUCCESS`` included, so the copy is a complete
      dataset); then the target's ``_SUCCESS`` is deleted, then its other objects (old and
      new files never mix), staging objects are copied in, ``_SUCCESS`` is written, and the
      copy aside and staging are deleted. A failure while copying deletes what was copied
      and puts the old dataset back from the copy aside.

    :meth:`commit` checks first that the lock is still this run's. ``--overwrite`` only
    replaces a fruitdask output (``_SUCCESS``, ``run.json`` or ``bundle.json`` at its top).
    """

    @classmethod
    def open(cls, url: str, storage_options: Mapping[str, Any] | None, overwrite: bool, run_id: str | None = None,
             lease_ttl: float = lease.DEFAULT_TTL_S) -> StagedOutput:
        """Check the target and prepare a staging prefix beside it; writes nothing.

        Raises
        ------
        OutputError
            The target exists (and ``overwrite`` is false), is a file, or is a bucket root.
        """
        target = cls(url.rstrip("/"), dict(storage_options or {}), run_id or uuid.uuid4().hex[:12], lease_ttl=lease_ttl)
        _refuse_bucket_root(url, target.url)
        fs, path = target.fs_path
        try:
            safety.forget_listings(fs, path)
            exists = fs.exists(path)
            if exists and not fs.isdir(path):
                raise OutputError(f"output {url!r} is a file: choose another --output (a folder or prefix)")
            entries = fs.ls(path, detail=False) if exists else []
            exists = exists and bool(entries)
            names = sorted({posixpath.basename(e.rstrip("/")) for e in entries})
            complete = exists and paths.SUCCESS_MARKER in names
            backups = safety.leftover_backups(fs, path) if exists and not complete and is_remote(target.url) else []
        except stores.storage_exceptions() as e:
            raise translate(e, url) from e
        if exists and not overwrite:
            state = "" if complete else f" (incomplete: no {paths.SUCCESS_MARKER}, left by an interrupted run?)"
            if backups:
                state += f"; the dataset it replaced is kept at {fs.unstrip_protocol(backups[-1])}"
            raise OutputError(f"output {url!r} already exists{state}: pass --overwrite to replace it, or choose another --output")
        if exists:
            safety.check_replaceable(url, names)
        return target

    @property
    def backup(self) -> str:
        """Where an old S3 dataset is copied aside while the new one is copied in."""
        return paths.backup_url(self.url, self.run_id)

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
                _, backup = get_fs(self.backup, self.storage_options)
                commit.publish_copy(fs, staging, target, backup, url=self.url, staging_url=self.staging,
                                    backup_url=self.backup)
            else:
                commit.publish_rename(fs, staging, target, self.url)
        except stores.storage_exceptions() as e:
            self.abort()
            raise OutputError(f"could not commit the output to {self.url!r}: {translate(e, self.url)}") from e
        except BaseException:  # Ctrl-C or SIGTERM mid-commit: same cleanup, then unwind
            self.abort()
            raise
        logger.info("committed output to %s", self.url)


def _refuse_bucket_root(url: str, target_url: str) -> None:
    if is_remote(target_url) and "/" not in fsspec.core.split_protocol(target_url)[1].strip("/"):
        raise OutputError(
            f"--output {url!r} is a bucket root: pass a prefix inside it, such as {paths.join(target_url, 'features/run-1')}"
        )


@contextmanager
def committed(target: StagedOutput) -> Iterator[StagedOutput]:
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
