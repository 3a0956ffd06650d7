"""The service follows the registry's champion (issue #32): ``serve --model MODELS``.

A ``--model`` location that holds ``champion.json`` is a registry
(:mod:`fruitdask.classifier.registry`): the service serves its champion and, every
``--model-poll-seconds`` and on SIGHUP, reads the alias again. A new champion is loaded in
a thread, off the event loop, while the old one serves on; then the one model reference of
:class:`~fruitdask.serve.state.ServeState` is replaced, on the event loop. The batcher reads
that reference once per batch, so a batch, and every answer, is computed by one model only.
When the new champion takes the very features of the old one (weights, image size, pooling,
precision), VGG16 stays and only the PCA and the classifier change hands
(:meth:`~fruitdask.serve.predictor.Predictor.load` with ``reuse``).

A champion that fails to load leaves the old one serving; the reason goes to the log, to
``/healthz`` and ``/readyz`` on the probe port (``last_switch_error``) and to the counter
``fruitdask_model_switch_failures_total``. It is not loaded again at each poll: only once
the alias moves, or on SIGHUP.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from fruitdask import storage
from fruitdask.classifier.registry import CHAMPION, Registry
from fruitdask.errors import FruitdaskError, ModelError
from fruitdask.serve.predictor import Predictor
from fruitdask.serve.state import ServeState
from fruitdask.storage import alias

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Champion:
    """The champion as ``champion.json`` names it: its version, folder and promotion time."""

    version: str
    url: str
    #: Unix seconds of ``promoted_at`` (else of the version's creation, which its name holds).
    promoted_at: float


def registry_at(location: str, storage_options: Mapping[str, Any] | None) -> Registry | None:
    """The registry at ``location`` when it holds ``champion.json``; ``None`` for a bundle."""
    found = alias.read(storage.join(location, CHAMPION), storage_options)
    return Registry(location, storage_options) if found.doc is not None else None


def read_champion(registry: Registry) -> Champion:
    """The champion the alias names now; :class:`ModelError` when it names none."""
    doc = registry.champion().doc or {}
    version = doc.get("version")
    if not isinstance(version, str) or not version:
        raise ModelError(f"{registry.path(CHAMPION)!r} names no champion version: promote one with "
                         f"`fruitdask model promote {registry.url} VERSION`")
    return Champion(version, registry.path(version), _seconds(doc.get("promoted_at"), version))


def _seconds(promoted_at: object, version: str) -> float:
    for text, fmt in ((promoted_at, None), (version.split("-", 1)[0], "%Y%m%dT%H%M%S.%fZ")):
        try:
            t = dt.datetime.fromisoformat(str(text)) if fmt is None else dt.datetime.strptime(str(text), fmt)
        except ValueError:
            continue
        return (t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)).timestamp()
    return time.time()  # neither is a time: the age counts from this load


class Follower:
    """Polls ``registry``'s alias and swaps in each new champion.

    Parameters
    ----------
    registry
        The registry ``--model`` names.
    load
        ``load(champion, serving)`` builds the new model (seconds to minutes; in a thread),
        reusing ``serving``'s VGG16 when the feature settings match.
    poll_s
        Seconds between two reads of the alias (``--model-poll-seconds``).
    """

    def __init__(self, registry: Registry, load: Callable[[Champion, Predictor | None], Predictor], poll_s: float) -> None:
        self.registry = registry
        self.load = load
        self.poll_s = poll_s
        self._wakeup: asyncio.Event | None = None
        self._retry = False
        #: The version that failed to load: not tried again until the alias moves or SIGHUP.
        self._failed: str | None = None

    def wake(self) -> None:
        """Check now (SIGHUP), and try again a champion that failed (on the event loop's thread)."""
        self._retry = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def run(self, state: ServeState) -> None:
        """Check every ``poll_s`` seconds, or at once when woken, until cancelled."""
        self._wakeup = asyncio.Event()
        state.request_check = self.wake
        while True:
            try:
                await asyncio.wait_for(self._wakeup.wait(), self.poll_s)
            except TimeoutError:
                pass
            self._wakeup.clear()
            retry, self._retry = self._retry, False
            await self.check(state, retry=retry)

    async def check(self, state: ServeState, *, retry: bool = False) -> None:
        """Read the alias; load and swap in its champion if it is not the one serving."""
        serving = state.predictor
        try:
            champion = await anyio.to_thread.run_sync(read_champion, self.registry)
        except (FruitdaskError, OSError, ValueError) as e:  # a storage hiccup or an edited alias: the champion serves on
            state.switch_error = f"the champion alias could not be read ({_reason(e)}); still serving {_name(serving)}"
            logger.warning("%s", state.switch_error)
            return
        if serving is not None and champion.version == serving.version:
            self._failed, state.switch_error = None, None  # e.g. rolled back from a broken one
            return
        if champion.version == self._failed and not retry:
            return
        logger.info("champion %s named by %s: loading it while %s serves", champion.version, self.registry.url, _name(serving))
        try:
            new = await anyio.to_thread.run_sync(self.load, champion, serving, abandon_on_cancel=True)
        except Exception as e:  # any failure of a load keeps the old model: said on the probe port
            self._failed = champion.version
            state.metrics.switch_failures.inc()
            state.switch_error = (f"champion {champion.version} could not be loaded ({_reason(e)}); "
                                  f"still serving {_name(serving)}")
            logger.error("%s", state.switch_error, exc_info=True)
            return
        state.predictor = new  # the swap: one reference, between two batches
        self._failed, state.switch_error = None, None
        state.metrics.serving(new.version, new.promoted_at)
        state.metrics.load_seconds.set(new.load_seconds)
        logger.info("now serving champion %s (was %s); it loaded in %.2f s", new.version, _name(serving), new.load_seconds)


def _name(predictor: Predictor | None) -> str:
    return str(predictor.version) if predictor is not None else "nothing"


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
