"""The commit protocol: how a run's staging prefix is published at its output, ``_SUCCESS``
last, whatever the storage (docs/s3.md, "The commit protocol").

:meth:`fruitdask.storage.target.StagedOutput.commit` calls :func:`publish_rename` on a local
file system and :func:`publish_copy` on S3; the checks and the copy-aside they rely on are in
:mod:`fruitdask.storage.safety`.
"""

from __future__ import annotations

import logging
import os

import fsspec

from fruitdask.errors import OutputError
from fruitdask.storage import paths, safety

logger = logging.getLogger(__name__)


def publish_rename(fs: fsspec.AbstractFileSystem, staging: str, target: str, url: str) -> None:
    """Locally: ``_SUCCESS`` into staging, the old target renamed aside, staging renamed onto
    the target (atomic), the old one deleted; a failure puts the old target back."""
    with open(os.path.join(staging, paths.SUCCESS_MARKER), "wb"):
        pass
    old = f"{staging}.old" if os.path.lexists(target) else None
    if old and os.path.isdir(target):
        safety.check_replaceable(url, os.listdir(target))
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


def publish_copy(fs: fsspec.AbstractFileSystem, staging: str, target: str, backup: str, *, url: str, staging_url: str,
                 backup_url: str) -> None:
    """On S3 (no rename): the old dataset copied aside to ``backup``, the target's ``_SUCCESS``
    deleted, then its other objects, staging copied in, ``_SUCCESS`` written, the copy aside
    and staging deleted; a failure while copying deletes what was copied and puts the old
    dataset back. ``url``, ``staging_url``, ``backup_url``: the same places as URLs, for messages."""
    # Other processes (workers) wrote staging: listings cached here are stale.
    safety.forget_listings(fs, staging)
    safety.forget_listings(fs, target)
    files = fs.find(staging + "/")
    if not files:
        raise OutputError(f"nothing to commit: the temporary output {staging_url!r} is empty or gone")
    marker = f"{target}/{paths.SUCCESS_MARKER}"
    old = fs.find(target + "/")
    safety.check_replaceable(url, safety.top_level_names(old, target))
    # The old dataset is copied aside before anything of it is deleted: from here on it
    # is complete either at the target or at the backup (see docs/s3.md).
    backup_files = safety.copy_aside(fs, old, target, backup) if old else []
    copies = [target + p[len(staging):] for p in files]
    try:
        if marker in old:
            # First, so a reader stops trusting the old dataset before any file goes.
            fs.rm_file(marker)
        if old:
            safety.delete_checked(fs, [p for p in old if p != marker], url)
        fs.copy(files, copies)
        safety.check_exactly(fs, target, copies, url)
        fs.pipe_file(marker, b"")
    except BaseException:
        safety.remove_quietly(fs, [marker, *copies, *old], target)
        if backup_files:
            safety.restore(fs, backup_files, backup, target, backup_url)
        raise
    safety.forget_listings(fs, target)
    if backup_files:
        safety.remove_quietly(fs, backup_files, backup)
    safety.remove_quietly(fs, files, staging)
