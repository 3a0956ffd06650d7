"""What the public and the probe applications share: the state of one server process.

:class:`ServeState` holds the model once loaded, the batcher, the metrics, the upload
limits and the drain; :class:`ApiError` is a refused request. Neither application imports
the other: both read this state, and the command runs them side by side.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anyio
from starlette.responses import JSONResponse

from fruitdask.serve.batcher import MicroBatcher
from fruitdask.serve.limits import ByteBudget, ClientLimiter
from fruitdask.serve.metrics import ServeMetrics
from fruitdask.serve.predictor import Predictor
from fruitdask.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

#: What the public port says of a failed load; the reason itself goes to the log and to the
#: probe port (kubelet and monitoring only): it can name buckets, paths and hashes.
PUBLIC_LOAD_FAILURE = "the model could not be loaded: the operators have the reason in the server's log"


class ApiError(Exception):
    """A refused request: HTTP ``status``, a stable ``error`` code and a ``reason`` sentence."""

    def __init__(self, status: int, error: str, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason, self.headers = status, error, reason, headers


def json_error(status: int, error: str, reason: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "reason": reason}, status_code=status, headers=headers)


@dataclass
class ServeState:
    """What the handlers share: the model once loaded, the batcher, the metrics, the limits.

    ``predictor`` is the one model reference: a request reads it once (to decode), the
    batcher once per batch (to compute); a new champion replaces it whole, on the event
    loop, between two batches (:mod:`fruitdask.serve.follow`)."""

    settings: ServeSettings
    metrics: ServeMetrics
    predictor: Predictor | None = None
    batcher: MicroBatcher | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.monotonic)
    #: When the drain began (readiness fails from then on); ``None`` while serving normally.
    draining_since: float | None = None
    budget: ByteBudget = field(init=False)
    decode_limiter: anyio.CapacityLimiter = field(init=False)
    uploads: ClientLimiter = field(init=False)
    #: Begins the process's stop (drain, close, exit): set by the runner that owns the servers.
    request_stop: Callable[[], None] | None = None
    #: Reads the champion now (SIGHUP), retrying one that failed; set while a registry is followed.
    request_check: Callable[[], None] | None = None
    #: Why the last new champion could not be served (the old one serves on); probe port only.
    switch_error: str | None = None
    #: The registry followed (its location: probe port only); ``None`` for a bundle location.
    following: str | None = None

    def __post_init__(self) -> None:
        self.budget = ByteBudget(self.settings.max_inflight_bytes)
        self.uploads = ClientLimiter(self.settings.max_uploads_per_client)
        # Decoding is CPU work: about one thread a core, not anyio's default pool of 40.
        self.decode_limiter = anyio.CapacityLimiter(self.settings.decode_threads)

    @property
    def ready(self) -> bool:
        return self.predictor is not None and self.batcher is not None

    def not_ready(self, public: bool = True) -> ApiError:
        """503 while loading; after a failed load, the reason only where ``public`` is false."""
        if self.load_error:
            return ApiError(503, "model_failed", PUBLIC_LOAD_FAILURE if public else f"the model could not be loaded: {self.load_error}")
        return ApiError(503, "loading", f"the model is loading ({time.monotonic() - self.started:.0f} s so far): retry shortly",
                        headers={"Retry-After": "2"})


async def drain(state: ServeState) -> None:
    """Fail readiness, then return once ``--drain-seconds`` have passed since the drain began.

    Meanwhile every request is still answered: load balancers and kube-proxy take a few
    seconds to see the failed readiness (or the pod's deletion) and stop sending traffic.
    Idempotent: the preStop hook's ``GET /drain`` and then SIGTERM wait once in all.
    """
    if state.draining_since is None:
        state.draining_since = time.monotonic()
        state.metrics.ready.set(0)
        logger.info("draining: /readyz fails; requests are served for %g s more", state.settings.drain_seconds)
    remaining = state.settings.drain_seconds - (time.monotonic() - state.draining_since)
    if remaining > 0:
        await asyncio.sleep(remaining)
