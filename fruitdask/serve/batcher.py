"""The micro-batcher: concurrent requests grouped into one model call.

Each request hands over one decoded image and awaits its row of probabilities. A single
asyncio task collects the waiting images: it takes the first, waits at most ``max_wait``
for more (less when ``max_batch`` are already there), and runs the model on the stack in
its own thread, so the event loop keeps accepting, reading and decoding requests while
VGG16 runs. While a batch runs, the next one fills up: under load, batches grow towards
``max_batch`` with no waiting at all, and throughput approaches the batched rate.

With ``current`` (the service that follows the registry's champion), the batcher reads the
model reference once per batch and computes the whole batch with it: a switch to a new
champion falls between two batches, never inside one, and each caller learns which model
computed its row (:meth:`MicroBatcher.submit_to_model`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """More requests are waiting than ``max_queue``: answer 503, do not queue."""


@dataclass(frozen=True)
class _Entry:
    item: np.ndarray
    future: asyncio.Future
    #: The model the item was prepared for (decoded at its image size); None without ``current``.
    prepared_for: Any = None


class MicroBatcher:
    """Group :meth:`submit` calls into calls of ``infer(images) -> rows``, or of
    ``infer(model, images) -> rows`` with the model ``current()`` returns once per batch.

    Parameters
    ----------
    infer
        ``(n, ...)`` stacked inputs to ``(n, ...)`` outputs; runs in one worker thread.
    current
        Returns the model to compute the next batch with (read on the event loop, once per
        batch); ``infer`` then takes it as its first argument.
    fits
        ``fits(model, prepared_for)``: whether an item prepared for one model can be
        computed by another (the same image size). An item that does not fit the current
        model is computed by the one it was prepared for, in a call of its own.
    max_batch, max_wait_s, max_queue
        Bounds: images per call, seconds the first image waits for company, images waiting.
    on_batch
        Called with ``(batch size, seconds)`` after each call (metrics).
    """

    def __init__(self, infer: Callable[..., np.ndarray], *, current: Callable[[], Any] | None = None,
                 fits: Callable[[Any, Any], bool] | None = None, max_batch: int = 32, max_wait_s: float = 0.005,
                 max_queue: int = 512, on_batch: Callable[[int, float], None] | None = None) -> None:
        self.infer = infer
        self.current = current
        self.fits = fits or (lambda model, prepared_for: True)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._pending: deque[_Entry] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        # One thread: one VGG16 call at a time, each using all of TensorFlow's intra-op threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fruitdask-infer")

    @property
    def depth(self) -> int:
        """Images waiting for the model."""
        return len(self._pending)

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fruitdask-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._pending:
            fut = self._pending.popleft().future
            if not fut.done():
                fut.set_exception(Overloaded("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: np.ndarray) -> np.ndarray:
        """Queue one input and wait for its output row."""
        row, _ = await self.submit_to_model(item, None)
        return row

    async def submit_to_model(self, item: np.ndarray, prepared_for: Any) -> tuple[np.ndarray, Any]:
        """Queue one input prepared for ``prepared_for``; its output row and the model that
        computed it (``None`` without ``current``)."""
        if self._task is None or self._wakeup is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"{len(self._pending)} images are waiting for the model (--max-queue {self.max_queue})")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Entry(item, fut, prepared_for))
        self._wakeup.set()
        return await fut

    async def _collect(self) -> list[_Entry]:
        assert self._wakeup is not None
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while len(self._pending) < self.max_batch:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        n = min(self.max_batch, len(self._pending))
        # A request whose client went away was cancelled: no model time for it.
        return [entry for entry in (self._pending.popleft() for _ in range(n)) if not entry.future.done()]

    def _groups(self, batch: list[_Entry]) -> list[tuple[Any, list[_Entry]]]:
        """The batch by the model that computes it: the current one (read once, here), or,
        for an item prepared for a model it does not fit, that model."""
        if self.current is None:
            return [(None, batch)]
        model = self.current()
        groups: dict[int, tuple[Any, list[_Entry]]] = {id(model): (model, [])}
        for entry in batch:
            m = model if self.fits(model, entry.prepared_for) else entry.prepared_for
            groups.setdefault(id(m), (m, []))[1].append(entry)
        return [g for g in groups.values() if g[1]]

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            for model, entries in self._groups(batch):
                await self._call(model, entries)

    async def _call(self, model: Any, batch: list[_Entry]) -> None:
        loop = asyncio.get_running_loop()
        stacked = np.stack([e.item for e in batch])
        start = time.perf_counter()
        try:
            if self.current is None:
                out = await loop.run_in_executor(self._executor, self.infer, stacked)
            else:
                out = await loop.run_in_executor(self._executor, self.infer, model, stacked)
        except Exception as e:
            # The batch fails, the server does not: every waiting request gets the error.
            logger.exception("inference failed for a batch of %d", len(batch))
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(e)
            return
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - start)
        for entry, row in zip(batch, out, strict=True):
            if not entry.future.done():
                entry.future.set_result((row, model))
