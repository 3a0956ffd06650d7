"""The output lock as a lease: a lock object that says until when it holds, renewed by a
heartbeat while its run lives, and taken over safely once its holder stopped renewing.

Every write of the lock object is conditional, so that of two runs racing for it only one
wins, whether they create it or take over an expired one. The conditional writes are the
store's (:class:`~fruitdask.storage.base.Store`: ``put_if_absent``, ``put_if_match``,
``delete_if_match``): on S3 a ``PutObject`` with ``If-None-Match: *`` or ``If-Match: <ETag
read>`` (:mod:`fruitdask.storage.s3`), locally ``O_EXCL`` and an ``os.replace`` under an
``O_EXCL`` claim (:mod:`fruitdask.storage.local`).

When a lease runs out is judged by the storage's clock, never by a holder's: the lock's
last write as the storage stamped it (S3 ``Last-Modified``, the local file's mtime) against
the storage's "now" (the ``Date`` of the same S3 answer; locally the mtime of a probe file
created beside the lock). A machine whose clock runs minutes ahead thus never takes over a
live lease. On the holder's own host a dead holder needs no lease at all: a lock whose host,
boot and pid namespace are this process's, and whose pid is gone or now another process
(another start time), is taken over at once (:func:`gone`).

:mod:`fruitdask.storage.safety` builds the lock's public functions on these.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import fsspec

from fruitdask.storage.base import Store

logger = logging.getLogger(__name__)

#: Seconds a lease holds without renewal; the heartbeat renews it every third of that.
DEFAULT_TTL_S = 180.0
#: S3's ``Last-Modified`` and ``Date`` count whole seconds: a lease is judged run out only
#: this much after its TTL, so that truncation never ends it early.
CLOCK_SLACK_S = 1.0


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def document(run_id: str, ttl_s: float, started_at: str | None = None) -> dict[str, Any]:
    """The lease document of this process for ``run_id``, valid ``ttl_s`` from its write.

    ``renewed_at`` and ``expires_at`` are this machine's clock, for people reading the lock;
    the expiry that counts is the storage's (:meth:`Held.expires`). ``boot_id``, ``pid_ns``
    and ``pid_start`` let a run on the same host tell a dead holder at once (:func:`gone`).
    """
    now, pid = time.time(), os.getpid()
    return {
        "run_id": run_id, "host": socket.gethostname(), **_machine(), "pid": pid, "pid_start": process_start(pid),
        "started_at": started_at or _iso(now), "renewed_at": _iso(now), "expires_at": _iso(now + ttl_s), "ttl_s": ttl_s,
    }


@functools.cache
def _machine() -> dict[str, str | None]:
    """What makes pids comparable: the kernel's boot and this process's pid namespace (two
    containers with one hostname have different namespaces); ``None`` where unknown."""

    def first_line(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.readline().strip() or None
        except OSError:
            return None

    try:
        pid_ns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = None
    return {"boot_id": first_line("/proc/sys/kernel/random/boot_id"), "pid_ns": pid_ns}


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, ``/proc/PID/stat`` field
    22), or ``None`` when there is no such live process (gone, a zombie, or no ``/proc``)."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):  # killed, not yet reaped: it runs no more code
        return None
    return int(fields[19])


def gone(doc: dict[str, Any]) -> str | None:
    """Why the holder of ``doc`` is known dead, when it ran on this host (same hostname, boot
    and pid namespace) and its pid is gone or now another process; ``None`` otherwise (alive,
    another machine or pod, or a lock of an older fruitdask): then only its lease counts."""
    here = {"host": socket.gethostname(), **_machine()}
    if None in here.values() or any(doc.get(k) != v for k, v in here.items()):
        return None
    pid, start = doc.get("pid"), doc.get("pid_start")
    if not isinstance(pid, int) or not isinstance(start, int):
        return None
    now = process_start(pid)
    if now is None:
        return f"pid {pid} is not running on this host"
    if now != start:
        return f"pid {pid} is now another process (started at tick {now}, the holder at tick {start})"
    return None


@dataclass(frozen=True)
class Held:
    """A lock object as read: its document, its version (S3 ETag, or the local content),
    when the storage last wrote it and the storage's clock when it was read (seconds since
    the epoch, both by the storage's clock: never compared with this machine's)."""

    doc: dict[str, Any]
    version: str
    modified: float
    now: float

    def ttl(self, default_ttl_s: float) -> float:
        """The holder's TTL (it renews every third of it), ``default_ttl_s`` for a lock without."""
        ttl = self.doc.get("ttl_s")
        return float(ttl) if isinstance(ttl, int | float) and ttl > 0 else default_ttl_s

    def expires(self, default_ttl_s: float) -> float:
        """When the lease runs out by the storage's clock: its last write plus its TTL."""
        return self.modified + self.ttl(default_ttl_s)

    def expired(self, default_ttl_s: float) -> bool:
        return self.now >= self.expires(default_ttl_s) + CLOCK_SLACK_S


def _parse(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        return {"run_id": "?", "host": "?", "pid": "?", "started_at": "? (unreadable lock)"}
    return doc if isinstance(doc, dict) else {"run_id": "?"}


def read(fs: fsspec.AbstractFileSystem, path: str, store: Store) -> Held | None:
    """The lock at ``path`` as :class:`Held`, or ``None`` when there is none."""
    snap = store.read_object(fs, path)
    return None if snap is None else Held(_parse(snap.data), snap.version, snap.modified, snap.now)


def create(fs: fsspec.AbstractFileSystem, path: str, store: Store, doc: dict[str, Any]) -> Held | None:
    """Create the lock with ``doc`` if there is none; ``None`` when one exists."""
    put = store.put_if_absent(fs, path, json.dumps(doc).encode())
    return Held(doc, put.version, put.at, put.at) if put is not None else None


def replace(fs: fsspec.AbstractFileSystem, path: str, store: Store, held: Held, doc: dict[str, Any]) -> Held | None:
    """Write ``doc`` over the lock only if it is still exactly ``held``; ``None`` otherwise
    (renewed, taken over or deleted meanwhile)."""
    put = store.put_if_match(fs, path, json.dumps(doc).encode(), held.version)
    return Held(doc, put.version, put.at, put.at) if put is not None else None


def delete(fs: fsspec.AbstractFileSystem, path: str, store: Store, held: Held) -> bool:
    """Delete the lock only if it is still exactly ``held``; False otherwise."""
    return store.delete_if_match(fs, path, held.version)


class Heartbeat:
    """Renews a held lease every ``ttl_s / 3`` seconds on a daemon thread until stopped.

    A renewal that finds the lock changed (another run took it over after this one stalled
    longer than the TTL) stops the heartbeat and marks it :attr:`lost`; the commit then
    refuses (:func:`fruitdask.storage.safety.check_lock`).
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, store: Store, held: Held, ttl_s: float) -> None:
        self.fs, self.path, self.store, self.held, self.ttl_s = fs, path, store, held, ttl_s
        self.lost = False
        self._stop = threading.Event()
        self._mutex = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"fruitdask-lease-{held.doc.get('run_id')}", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def renew(self) -> bool:
        """Renew now; False (and :attr:`lost`) when the lock is no longer this lease."""
        with self._mutex:
            if self.lost:
                return False
            doc = document(str(self.held.doc["run_id"]), self.ttl_s, self.held.doc.get("started_at"))
            new = replace(self.fs, self.path, self.store, self.held, doc)
            if new is None:
                self.lost = True
                logger.error("lost the output lock %s: another run took it over (this run stopped renewing it for "
                             "longer than its %g s lease); this run will not commit", self.path, self.ttl_s)
                return False
            self.held = new
            return True

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    return
            except self.store.exceptions() as e:  # transient: the next beat tries again
                logger.warning("could not renew the output lock %s (%s): retrying in %.0f s", self.path, e, self.ttl_s / 3)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
