"""What keeps an output location safe: the run lock, the "is it ours?" check before an
``--overwrite``, and the copy-aside of an old dataset while a new one is copied in on S3.

:class:`~fruitdask.storage.target.LockedOutput` (both lifecycles) and :mod:`fruitdask.storage.commit` call
these; the protocol they make up, and the reader's contract, are described in docs/s3.md
("The commit protocol").
"""

from __future__ import annotations

import datetime as dt
import logging
import posixpath
import time

import fsspec

from fruitdask.errors import OutputBusyError, OutputError, StorageError
from fruitdask.storage import lease, stores
from fruitdask.storage.base import Store
from fruitdask.storage.paths import BACKUP, OUTPUT_MARKERS, SUCCESS_MARKER, sibling_name, split

logger = logging.getLogger(__name__)

def check_replaceable(url: str, names: list[str]) -> None:
    """Refuse to replace a non-empty location that is not a fruitdask output.

    ``names`` are the entries directly under the location (files and folders). ``--overwrite``
    is meant to replace an earlier run or model, never a folder of someone's data that was
    named by mistake.
    """
    if not names or any(n in OUTPUT_MARKERS for n in names):
        return
    shown = ", ".join(sorted(names)[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
    raise OutputError(
        f"--overwrite refuses to replace {url!r}: it holds {shown} and no {', '.join(OUTPUT_MARKERS)}, so it is "
        "not a fruitdask output; choose another --output, or delete it yourself if it is meant to go"
    )


def top_level_names(paths: list[str], root: str) -> list[str]:
    """Distinct first path components of ``paths`` below ``root``."""
    root = root.rstrip("/") + "/"
    return sorted({p[len(root):].split("/", 1)[0] for p in paths if p.startswith(root)})


# --- the run lock ----------------------------------------------------------------------


def _busy(target_url: str, lock_url: str, holder: lease.Held | None, run_id: str, ttl_s: float,
          waited_s: float) -> OutputBusyError:
    d = holder.doc if holder is not None else None
    until = _iso(holder.expires(ttl_s)) if holder is not None else None
    who = (f"run {d.get('run_id')} (host {d.get('host')}, pid {d.get('pid')}, since {d.get('started_at')}, "
           f"lease until {until} by the storage's clock)" if d else "another run")
    waited = f" after waiting {waited_s:g} s (--wait-lock)" if waited_s > 0 else ""
    dead = (f"its lease runs out at {until} unless renewed, and the next run then takes the lock over"
            if until else f"delete the lock {lock_url} and run again")
    return OutputBusyError(
        f"output {target_url!r} is being written by {who}; this run ({run_id}) stops{waited}: wait for it to finish "
        f"(--wait-lock SECONDS waits for it), or, if that run is dead (killed with SIGKILL), {dead}"
    )


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def store_of(fs: fsspec.AbstractFileSystem) -> Store:
    """The store whose conditional writes guard a lock on ``fs``."""
    store = stores.for_fs(fs)
    if store is None:
        raise StorageError(f"no fruitdask store serves {fs.protocol!r}: the output lock needs conditional writes")
    return store


#: Seconds between two tries of a run that waits for the lock (``--wait-lock``).
POLL_S = 1.0


def acquire_lease(fs: fsspec.AbstractFileSystem, path: str, store: Store, target_url: str, lock_url: str, run_id: str,
                  ttl_s: float = lease.DEFAULT_TTL_S, wait_s: float = 0.0) -> lease.Held:
    """Take the lock at ``path`` for ``ttl_s`` seconds: create it, or take over one whose
    holder is dead (its lease ran out by the storage's clock, or its process is gone from
    this host: :func:`fruitdask.storage.lease.gone`), logged with that run's name. While
    another run holds it, try again every :data:`POLL_S` for up to ``wait_s`` seconds; then
    raise :class:`OutputBusyError`.

    Creation and takeover are conditional writes (:mod:`fruitdask.storage.lease`): of two
    runs racing, only one gets the lock; a store that ignores the conditions still gets the
    re-check at commit (:func:`check_lock`).
    """
    deadline, told = time.monotonic() + max(0.0, wait_s), False
    while True:
        held, current = _try_take(fs, path, store, lock_url, run_id, ttl_s)
        if held is not None:
            return held
        left = deadline - time.monotonic()
        if left <= 0:
            raise _busy(target_url, lock_url, current, run_id, ttl_s, wait_s)
        if not told:
            logger.info("output %s is locked by run %s: waiting up to %g s for it (--wait-lock)", target_url,
                        current.doc.get("run_id") if current is not None else "?", wait_s)
            told = True
        time.sleep(min(POLL_S, left))


def _try_take(fs: fsspec.AbstractFileSystem, path: str, store: Store, lock_url: str, run_id: str,
              ttl_s: float) -> tuple[lease.Held | None, lease.Held | None]:
    """One attempt: (the lease taken, ``None``) or (``None``, the live lock that kept us out)."""
    doc = lease.document(run_id, ttl_s)
    current = None
    for _ in range(3):  # the lock may change between our reads: a few tries, then "busy"
        held = lease.create(fs, path, store, doc)
        if held is not None:
            return held, None
        current = lease.read(fs, path, store)
        if current is None:
            continue  # released meanwhile
        dead = lease.gone(current.doc)
        if dead is None and not current.expired(ttl_s):
            break
        held = lease.replace(fs, path, store, current, doc)
        if held is not None:
            d = current.doc
            why = (f"at once: its process is gone ({dead}): that run is dead" if dead else
                   f"whose lease ran out at {_iso(current.expires(ttl_s))} (by the storage's clock) without renewal: "
                   "that run is presumed dead")
            logger.warning("took over the output lock %s from run %s (host %s, pid %s, since %s), %s", lock_url,
                           d.get("run_id"), d.get("host"), d.get("pid"), d.get("started_at"), why)
            return held, None
    return None, current


def check_lock(fs: fsspec.AbstractFileSystem, path: str, target_url: str, lock_url: str, run_id: str) -> None:
    """Raise :class:`OutputBusyError` unless the lock at ``path`` is still this run's."""
    fs.invalidate_cache(posixpath.dirname(path))
    holder = lease.read(fs, path, store_of(fs))
    if holder is None or holder.doc.get("run_id") != run_id:
        raise _busy(target_url, lock_url, holder, run_id, lease.DEFAULT_TTL_S, 0.0)


def release_lock(fs: fsspec.AbstractFileSystem, path: str, run_id: str) -> None:
    """Delete the lock if it is this run's; a failure is logged (the run's outcome stands)."""
    store = store_of(fs)
    try:
        fs.invalidate_cache(posixpath.dirname(path))
        held = lease.read(fs, path, store)
        if held is not None and held.doc.get("run_id") == run_id and not lease.delete(fs, path, store, held):
            logger.warning("did not remove the output lock %s: it changed while this run released it", path)
    except stores.storage_exceptions() as e:
        logger.warning("could not remove the output lock %s: %s", path, e)


# --- copy-aside of the old dataset (S3) ------------------------------------------------


def copy_aside(fs: fsspec.AbstractFileSystem, old: list[str], target: str, backup: str) -> list[str]:
    """Copy the old dataset ``old`` (every object under ``target``, ``_SUCCESS`` included)
    server-side to ``backup``; return the backup's objects. On failure the partial backup
    is removed and the target was never touched."""
    copies = [backup + p[len(target):] for p in old]
    try:
        fs.copy(old, copies)
    except BaseException:
        remove_quietly(fs, copies, backup)
        raise
    return copies


def restore(fs: fsspec.AbstractFileSystem, backup_files: list[str], backup: str, target: str, backup_url: str) -> bool:
    """Copy a backed-up dataset back to ``target`` (``_SUCCESS`` last), then drop the backup.

    Returns False, after logging where the old dataset still is, when the copy back fails.
    """
    marker = f"{backup}/{SUCCESS_MARKER}"
    rest = [p for p in backup_files if p != marker]
    try:
        fs.copy(rest, [target + p[len(backup):] for p in rest])
        # The marker only goes back over exactly the old dataset (nothing left of the new one).
        check_exactly(fs, target, [target + p[len(backup):] for p in rest], fs.unstrip_protocol(target))
        if marker in backup_files:
            fs.copy(marker, f"{target}/{SUCCESS_MARKER}")
    except (*stores.storage_exceptions(), OutputError) as e:  # type: ignore[misc]  # a tuple built at run time
        logger.error(
            "could not put the previous dataset back at %s (%s): it is intact at %s; copy it back with "
            "`aws s3 sync %s %s`", target, e, backup_url, backup_url, fs.unstrip_protocol(target),
        )
        return False
    remove_quietly(fs, backup_files, backup)
    return True


def delete_checked(fs: fsspec.AbstractFileSystem, paths: list[str], target_url: str) -> None:
    """Delete ``paths`` with the store's bulk delete (:meth:`~fruitdask.storage.base.Store.delete_many`)
    and raise :class:`OutputError` naming every one it did not delete: a commit must never
    write ``_SUCCESS`` over a mix of old and new parts (issue 23, item 8)."""
    store = store_of(fs)
    failed = store.delete_many(fs, paths)
    for p in paths:
        fs.invalidate_cache(posixpath.dirname(p))
    if failed:
        shown = ", ".join(failed[:5]) + (f", ... ({len(failed)} objects)" if len(failed) > 5 else "")
        raise OutputError(
            f"could not commit the output to {target_url!r}: {store.name} did not delete {shown}; the commit is rolled "
            f"back (the old dataset is put back): grant {store.delete_permission} and run again"
        )


def check_exactly(fs: fsspec.AbstractFileSystem, target: str, expected: list[str], target_url: str) -> None:
    """Raise :class:`OutputError` unless the objects under ``target`` are ``expected``, no
    more, no fewer (a fresh listing, before ``_SUCCESS`` vouches for them)."""
    forget_listings(fs, target)
    present = set(fs.find(target.rstrip("/") + "/"))
    extra, missing = sorted(present - set(expected)), sorted(set(expected) - present)
    if extra or missing:
        raise OutputError(
            f"could not commit the output to {target_url!r}: before {SUCCESS_MARKER} it held "
            f"{len(extra)} objects this run did not write ({', '.join(extra[:3]) or '-'}) and lacked {len(missing)} "
            f"({', '.join(missing[:3]) or '-'}); the commit is rolled back: is another writer at work on it?"
        )


def remove_quietly(fs: fsspec.AbstractFileSystem, paths: list[str], prefix: str) -> None:
    """Delete those of ``paths`` (all under ``prefix``) that exist, in bulk; log (not raise)
    a failure: a cleanup must not hide the error that made it necessary."""
    try:
        forget_listings(fs, prefix)
        present = set(fs.find(prefix.rstrip("/") + "/"))
        doomed = [p for p in paths if p in present]
        if doomed:
            fs.rm(doomed)
    except stores.storage_exceptions() as e:
        logger.warning("could not remove %d objects under %s: %s", len(paths), prefix, e)


def forget_listings(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drop cached listings of ``path``, its parents and everything under it: other
    processes (workers) write there, and a stale listing would hide their files."""
    fs.invalidate_cache(path)
    below = path.rstrip("/") + "/"
    for key in [k for k in list(fs.dircache) if k.startswith(below)]:
        fs.dircache.pop(key, None)


def leftover_backups(fs: fsspec.AbstractFileSystem, target: str) -> list[str]:
    """Backups ``.<name>.fruitdask-old-*`` beside ``target`` left by a killed ``--overwrite``."""
    try:
        entries = fs.ls(split(target)[0], detail=False)
    except FileNotFoundError:
        return []
    prefix = sibling_name(target, BACKUP)
    return sorted(e for e in entries if posixpath.basename(e.rstrip("/")).startswith(prefix))
