"""What keeps an output location safe: the run lock, the "is it ours?" check before an
``--overwrite``, and the copy-aside of an old dataset while a new one is copied in on S3.

:class:`~fruitdask.storage.OutputTarget` calls these; the protocol they make up, and the
reader's contract, are described in docs/s3.md ("The commit protocol").
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import posixpath
import socket
from typing import Any

import fsspec

import fruitdask.storage.s3errors as s3errors
from fruitdask.errors import OutputBusyError, OutputError

logger = logging.getLogger(__name__)

SUCCESS_MARKER = "_SUCCESS"
#: Top-level names that mark a folder as a fruitdask output (a run, or a model bundle).
OUTPUT_MARKERS = (SUCCESS_MARKER, "run.json", "bundle.json")


def sibling(url: str, suffix: str) -> str:
    """The hidden sibling ``.<name><suffix>`` of ``url`` (same parent prefix)."""
    parent, name = url.rsplit("/", 1) if "/" in url else (".", url)
    return f"{parent}/.{name}{suffix}"


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


def lock_document(run_id: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _busy(target_url: str, lock_url: str, holder: dict[str, Any] | None, run_id: str) -> OutputBusyError:
    who = (
        f"run {holder.get('run_id')} (host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('started_at')})"
        if holder else "another run"
    )
    return OutputBusyError(
        f"output {target_url!r} is being written by {who}; this run ({run_id}) stops: wait for it to finish, "
        f"or, if that run is dead (killed with SIGKILL), delete the lock {lock_url} and run again"
    )


def read_lock(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, Any] | None:
    """The lock document at ``path``, or ``None`` when there is none."""
    try:
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(data)
    except ValueError:
        return {"run_id": "?", "host": "?", "pid": "?", "started_at": "? (unreadable lock)"}
    return doc if isinstance(doc, dict) else {"run_id": "?"}


def acquire_lock(fs: fsspec.AbstractFileSystem, path: str, remote: bool, target_url: str, lock_url: str, run_id: str) -> None:
    """Create the lock object at ``path`` if none exists; else raise :class:`OutputBusyError`.

    Locally ``O_EXCL`` makes creation atomic. On S3 a conditional ``PutObject``
    (``If-None-Match: *``, honoured by AWS S3 since 2024, MinIO and moto) does; a store that
    ignores the condition still gets the re-check at commit (:func:`check_lock`).
    """
    body = json.dumps(lock_document(run_id)).encode()
    if not remote:
        os.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise _busy(target_url, lock_url, read_lock(fs, path), run_id) from None
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        return
    bucket, _, key = path.partition("/")
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
    except s3errors.storage_exceptions() as e:
        err = s3errors.client_error(e)
        code = str(err.response.get("Error", {}).get("Code", "")) if err is not None else ""
        if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
            raise _busy(target_url, lock_url, read_lock(fs, path), run_id) from e
        raise
    fs.invalidate_cache(posixpath.dirname(path))


def check_lock(fs: fsspec.AbstractFileSystem, path: str, target_url: str, lock_url: str, run_id: str) -> None:
    """Raise :class:`OutputBusyError` unless the lock at ``path`` is still this run's."""
    fs.invalidate_cache(posixpath.dirname(path))
    holder = read_lock(fs, path)
    if holder is None or holder.get("run_id") != run_id:
        raise _busy(target_url, lock_url, holder, run_id)


def release_lock(fs: fsspec.AbstractFileSystem, path: str, run_id: str) -> None:
    """Delete the lock if it is this run's; a failure is logged (the run's outcome stands)."""
    try:
        fs.invalidate_cache(posixpath.dirname(path))
        holder = read_lock(fs, path)
        if holder is not None and holder.get("run_id") == run_id:
            fs.rm_file(path)
    except s3errors.storage_exceptions() as e:
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
        check_exactly(fs, target, [target + p[len(backup):] for p in rest], "s3://" + target)
        if marker in backup_files:
            fs.copy(marker, f"{target}/{SUCCESS_MARKER}")
    except (*s3errors.storage_exceptions(), OutputError) as e:
        logger.error(
            "could not put the previous dataset back at %s (%s): it is intact at %s; copy it back with "
            "`aws s3 sync %s %s`", target, e, backup_url, backup_url, "s3://" + target,
        )
        return False
    remove_quietly(fs, backup_files, backup)
    return True


def delete_checked(fs: fsspec.AbstractFileSystem, paths: list[str], target_url: str) -> None:
    """Delete ``paths`` (``bucket/key``) with S3's bulk delete and raise :class:`OutputError`
    naming every key it did not delete.

    ``DeleteObjects`` answers 200 and lists per-key failures (``AccessDenied`` from a bucket
    policy, an object lock) in ``Errors``; s3fs's ``rm`` drops that list, which let a commit
    write ``_SUCCESS`` over a mix of old and new parts (issue 23, item 8).
    """
    by_bucket: dict[str, list[str]] = {}
    for p in paths:
        bucket, _, key = p.partition("/")
        by_bucket.setdefault(bucket, []).append(key)
    failed: list[str] = []
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            out = fs.call_s3("delete_objects", Bucket=bucket, Delete=batch)
            failed += [f"{bucket}/{e.get('Key')} ({e.get('Code')})" for e in out.get("Errors") or []]
    for p in paths:
        fs.invalidate_cache(posixpath.dirname(p))
    if failed:
        shown = ", ".join(failed[:5]) + (f", ... ({len(failed)} objects)" if len(failed) > 5 else "")
        raise OutputError(
            f"could not commit the output to {target_url!r}: S3 did not delete {shown}; the commit is rolled back "
            "(the old dataset is put back): grant s3:DeleteObject on the output prefix (check bucket policies and "
            "object locks) and run again"
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
    except s3errors.storage_exceptions() as e:
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
    parent, name = target.rsplit("/", 1)
    try:
        entries = fs.ls(parent, detail=False)
    except FileNotFoundError:
        return []
    prefix = f".{name}.fruitdask-old-"
    return sorted(e for e in entries if posixpath.basename(e.rstrip("/")).startswith(prefix))
