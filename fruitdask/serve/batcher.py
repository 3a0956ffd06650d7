"""The micro-batcher: concurrent requests grouped into one model call.

Each request hands over one decoded image and awaits its row of probabilities. A single
asyncio task collects the waiting images: it takes the first, waits at most ``max_wait``
for more (less when ``max_batch`` are already there), and runs the model on the stack in
its own thread, so the event loop keeps accepting, reading and decoding requests while
VGG16 runs. While a batch runs, the next one fills up: under load, batches grow towards
``max_batch`` with no waiting at all, and throughput approaches the batched rate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

logger = logging.getLogger(__name__)


class Overloaded(Exception):
    """More requests are waiting than ``max_queue``: answer 503, do not queue."""


class MicroBatcher:
    """Group :meth:`submit` calls into calls of ``infer(images) -> rows``.

    Parameters
    ----------
    infer
        ``(n, ...)`` stacked inputs to ``(n, ...)`` outputs; runs in one worker thread.
    max_batch, max_wait_s, max_queue
        Bounds: images per call, seconds the first image waits for company, images waiting.
    on_batch
        Called with ``(batch size, seconds)`` after each call (metrics).
    """

    def __init__(self, infer: Callable[[np.ndarray], np.ndarray], *, max_batch: int = 32, max_wait_s: float = 0.005,
                 max_queue: int = 512, on_batch: Callable[[int, float], None] | None = None) -> None:
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._pending: deque[tuple[np.ndarray, asyncio.Future]] = deque()
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
            _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(Overloaded("the server is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, item: np.ndarray) -> np.ndarray:
        """Queue one input and wait for its output row."""
        if self._task is None or self._wakeup is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        if len(self._pending) >= self.max_queue:
            raise Overloaded(f"{len(self._pending)} images are waiting for the model (--max-queue {self.max_queue})")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        self._wakeup.set()
        return await fut

    async def _collect(self) -> list[tuple[np.ndarray, asyncio.Future]]:
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
        return [entry for entry in (self._pending.popleft() for _ in range(n)) if not entry[1].done()]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            start = time.perf_counter()
            try:
                out = await loop.run_in_executor(self._executor, self.infer, np.stack([item for item, _ in batch]))
            except Exception as e:
                # The batch fails, the server does not: every waiting request gets the error.
                logger.exception("inference failed for a batch of %d", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - start)
            for (_, fut), row in zip(batch, out, strict=True):
                if not fut.done():
                    fut.set_result(row)
