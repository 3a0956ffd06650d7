"""Progress of the featurization, counted in images (not tasks).

Backends call :meth:`Progress.start` with the number of images, then
:meth:`Progress.advance` with the images of each partition as it completes (Dask: as its
future finishes; Spark: as an accumulator of featurized images grows), then
:meth:`Progress.close`. :class:`NullProgress` does nothing, so backends never branch on
``--quiet``; :class:`ImageProgressBar` draws ``done/total, images/s, ETA`` on a stream.
Only the CLI chooses which one (:func:`progress_bar`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TextIO


class Progress:
    """The interface backends talk to; this base class is the silent no-op bar."""

    def start(self, total: int) -> None:
        """Featurization begins for ``total`` images."""

    def advance(self, images: int) -> None:
        """``images`` more images are done (featurized or found unusable)."""

    def close(self) -> None:
        """Featurization is over (or failed)."""


NullProgress = Progress


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"



def steady_rate(marks: Sequence[tuple[float, float]], start: int) -> float | None:
    """The featurization's throughput once warm: images per second from mark ``start`` to the
    last one.

    ``marks`` are ``(seconds, images done so far)`` at the end of each piece of work (a
    partition, a batch), in time order; those up to ``start`` hold the warm-up (imports, the
    model's build, the first batches: a fixed cost per run, left out). Each caller picks
    ``start``: ``run.json``'s ``steady_images_per_s`` the first mark past a tenth of the images
    (:func:`fruitdask.backends.dask.backend.steady_after_warm_up`), the bench the end of the
    first wave of partitions, one per slot (:func:`fruitdask.bench.summary.first_wave_rate`),
    or of the raw engine's first batch. None when no mark follows ``start`` or no time passed.
    """
    if not 0 <= start < len(marks) - 1:
        return None
    (t0, n0), (t1, n1) = marks[start], marks[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else None

class ImageProgressBar(Progress):
    """``[#####.....]  40/120 images  3.2 images/s  ETA 0:25`` on ``stream``.

    On a terminal the line is redrawn in place; elsewhere (a log file, a Kubernetes pod's
    output) a line is written at most every ``interval`` seconds, and at the end.
    """

    def __init__(self, stream: TextIO | None = None, *, width: int = 30, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interval = interval
        self.clock = clock
        self.total = 0
        self.done = 0
        self._t0 = 0.0
        self._last_line = float("-inf")
        self._last_text = ""
        self._lock = threading.Lock()
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._open = False

    def start(self, total: int) -> None:
        with self._lock:
            self.total, self.done, self._t0, self._open = int(total), 0, self.clock(), True
            self._draw(force=True)

    def advance(self, images: int) -> None:
        with self._lock:
            done = min(self.total, self.done + int(images))
            if not self._open or done == self.done:
                return
            self.done = done
            self._draw(force=self.done >= self.total)

    def close(self) -> None:
        with self._lock:
            if not self._open:
                return
            self._open = False
            self._draw(force=True)
            if self._tty:
                self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        """The bar's current text (without the carriage return)."""
        elapsed = max(self.clock() - self._t0, 0.0)
        frac = self.done / self.total if self.total else 1.0
        filled = int(frac * self.width)  # full only when every image is done
        rate = self.done / elapsed if elapsed > 0 and self.done else None
        if self.done >= self.total:
            eta = f"in {_clock(elapsed)}"
        elif rate:
            eta = f"ETA {_clock((self.total - self.done) / rate)}"
        else:
            eta = "ETA --:--"
        speed = f"{rate:.1f} images/s" if rate else "-- images/s"
        digits = len(str(self.total))
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done:>{digits}}/{self.total} images  {speed}  {eta}"

    def _draw(self, force: bool = False) -> None:
        now = self.clock()
        if self._tty:
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif force or now - self._last_line >= self.interval:
            text = self.line()
            if text != self._last_text:  # close() after the last advance adds no duplicate line
                self.stream.write(text + "\n")
                self.stream.flush()
            self._last_line, self._last_text = now, text


def progress_bar(quiet: bool, stream: TextIO | None = None) -> Progress:
    """The CLI's bar: a no-op when ``quiet``, else an :class:`ImageProgressBar` on stderr."""
    return Progress() if quiet else ImageProgressBar(stream)


class Poller:
    """Call ``read()`` every ``period`` seconds in a thread and advance ``bar`` by its growth.

    For engines that expose a running count (Spark's accumulator of featurized images)
    rather than per-partition completions.
    """

    def __init__(self, bar: Progress, read: Callable[[], int], period: float = 0.5) -> None:
        self.bar, self.read, self.period = bar, read, period
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fruitdask-progress", daemon=True)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def poll(self) -> None:
        value = int(self.read())
        if value > self.seen:
            self.bar.advance(value - self.seen)
            self.seen = value

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.poll()
