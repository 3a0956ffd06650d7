"""Serving a bundle: two uvicorn servers in one process, and the order in which they stop.

:func:`serve_bundle` is what ``fruitdask serve`` calls once its flags are parsed: the region
guard, the bundle, then :func:`run_server` until the process is told to stop.

The public application listens on ``--port`` under ``--max-connections``; the probe
application (:mod:`fruitdask.serve.probes`) on ``--probe-port`` with no cap. Stopping:

1. readiness fails (SIGTERM, or the preStop hook's ``GET /drain`` from inside the pod);
2. for ``--drain-seconds`` every request is still served, while load balancers and
   kube-proxy stop sending new ones;
3. the public port closes, open requests finish (up to :data:`GRACEFUL_SECONDS`);
4. the probe port closes, the process exits 0.

``GET /drain`` and SIGTERM start the same stop, and it always ends with the exit: a pod
drained by mistake is restarted by Kubernetes instead of staying out of service for good.
Ctrl-C (SIGINT) skips the wait. SIGHUP reads a registry's champion alias at once
(:mod:`fruitdask.serve.follow`); with a bundle location it is logged and ignored. The runner owns the signals: the uvicorn servers do not
install theirs. Neither server reads ``X-Forwarded-*`` (uvicorn's ``proxy_headers`` is off):
the peer address stays the socket's, and only ``--trusted-proxies`` decides whose
``X-Forwarded-For`` counts (:func:`fruitdask.serve.limits.client_key`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import uvicorn
from starlette.applications import Starlette

from fruitdask import storage
from fruitdask.classifier.bundle import ModelBundle
from fruitdask.classifier.registry import CHAMPION, Registry
from fruitdask.errors import FruitdaskError, ModelError
from fruitdask.serve import follow
from fruitdask.serve.app import create_app
from fruitdask.serve.predictor import Predictor
from fruitdask.serve.probes import create_probe_app
from fruitdask.serve.protocol import header_timeout_protocol
from fruitdask.serve.settings import ServeSettings
from fruitdask.serve.state import ServeState, drain

if TYPE_CHECKING:
    from fruitdask.config import StorageSettings

logger = logging.getLogger(__name__)

#: Seconds open requests get to finish once the public port closed.
GRACEFUL_SECONDS = 30


class _Server(uvicorn.Server):
    """A uvicorn server that leaves SIGTERM and SIGINT to :class:`Servers`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Servers:
    """The public and the probe server of one ``fruitdask serve`` process."""

    def __init__(self, app: Starlette, probe_app: Starlette, *, log_level: str = "info", access_log: bool = False) -> None:
        self.state: ServeState = app.state.serve
        s = self.state.settings
        self.public = _Server(uvicorn.Config(
            app, host=s.host, port=s.port, http=header_timeout_protocol(s.header_timeout_s), lifespan="on",
            timeout_keep_alive=s.keep_alive_s, limit_concurrency=s.max_connections, timeout_graceful_shutdown=GRACEFUL_SECONDS,
            log_level=log_level, access_log=access_log, server_header=False, proxy_headers=False))
        self.probes = _Server(uvicorn.Config(
            probe_app, host=s.host, port=s.probe_port, http=header_timeout_protocol(s.header_timeout_s), lifespan="off",
            timeout_keep_alive=s.keep_alive_s, timeout_graceful_shutdown=5, log_level=log_level, access_log=access_log,
            server_header=False, proxy_headers=False))
        self._stopping: asyncio.Task | None = None
        # GET /drain (the preStop hook) begins the same stop as SIGTERM: it ends with the exit.
        self.state.request_stop = self.stop
        #: Why a server could not start (a port in use), once :meth:`serve` returned.
        self.error: str | None = None

    @property
    def started(self) -> bool:
        return self.public.started and self.probes.started

    def stop(self, *, wait: bool = True) -> None:
        """Begin the stop (from the event loop's thread): drain first unless ``wait`` is false."""
        if self._stopping is None or not wait:
            self._stopping = asyncio.get_running_loop().create_task(self._stop(wait), name="fruitdask-stop")

    def exit_now(self) -> None:
        """Stop without draining (a failed model load); callable from any thread."""
        self.public.should_exit = True

    async def _stop(self, wait: bool) -> None:
        if wait:
            await drain(self.state)
        elif self.state.draining_since is None:
            self.state.draining_since = time.monotonic()
        logger.info("closing the public port; open requests get up to %d s", GRACEFUL_SECONDS)
        self.public.should_exit = True

    async def serve(self) -> None:
        """Run both until the public server stops; signals are handled when on the main thread."""
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, lambda: self.stop(wait=False))
            loop.add_signal_handler(signal.SIGHUP, self.hangup)
        probes = loop.create_task(self._serve(self.probes, "probe"), name="fruitdask-probes")
        try:
            await self._serve(self.public, "API")
        finally:
            self.probes.should_exit = True
            await probes
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)

    def hangup(self) -> None:
        """SIGHUP: read the champion alias now (and retry a champion that failed to load)."""
        if self.state.request_check is None:
            logger.info("SIGHUP: this server serves a bundle (or is still loading), it follows no registry")
            return
        logger.info("SIGHUP: reading the champion alias now")
        self.state.request_check()

    async def _serve(self, server: uvicorn.Server, what: str) -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn's answer to a port it cannot listen on (it logged why)
            self.error = self.error or (f"the {what} port {server.config.port} could not be opened "
                                        "(in use?): pass another --port / --probe-port")
            self.public.should_exit = True

    def run(self) -> None:
        asyncio.run(self.serve())


def serve_bundle(model: str, weights: str | None, settings: ServeSettings, storage_cfg: StorageSettings, *,
                 log_level: str = "info", access_log: bool = False) -> None:
    """Serve the bundle at ``model``, or the champion of the registry at ``model`` (followed:
    :mod:`fruitdask.serve.follow`), until SIGTERM/SIGINT; the weights load in the background.

    Raises
    ------
    RegionError
        If the bundle or its weights (``weights``, else the location ``bundle.json`` names)
        live outside the allowed regions: checked before anything is read from them.
    ModelError
        If the model could not be loaded (the server stopped), or a registry names no champion.
    """
    # Before anything is read: the bundle and the weights must live in allowed (EU) regions.
    storage.guard_regions([model, weights], storage_cfg)
    opts = storage.storage_options(storage_cfg)
    registry = follow.registry_at(model, opts)
    champion = follow.read_champion(registry) if registry is not None else None
    source = champion.url if champion is not None else model
    bundle = _first_bundle(source, opts, registry is None)  # small JSON + npz: a bad --model fails here, at once

    def load(bundle: ModelBundle, source: str, champion: follow.Champion | None, serving: Predictor | None) -> Predictor:
        # The weights' location comes from bundle.json: guarded now, whatever its kind, not after the TF import.
        storage.guard_regions([weights or bundle.weights.spec], storage_cfg)
        # The weights location in bundle.json is data: guarded like any location given by flag.
        return Predictor.load(bundle, source, opts, weights_override=weights, max_pixels=settings.max_pixels,
                              threads=settings.threads, warm_batches=(1, settings.max_batch),
                              guard=lambda urls: storage.guard_regions(urls, storage_cfg), reuse=serving,
                              version=champion.version if champion else None,
                              promoted_at=champion.promoted_at if champion else None)

    storage.guard_regions([weights or bundle.weights.spec], storage_cfg)
    follower = None
    if registry is not None:
        follower = follow.Follower(registry, lambda c, serving: load(ModelBundle.load(c.url, opts), c.url, c, serving),
                                   settings.model_poll_s)
        logger.info("%s is a model registry: serving its champion %s, reading the alias every %g s and on SIGHUP",
                    model, source, settings.model_poll_s)
    logger.info("serving %s on http://%s:%d, probes on port %d (the model loads in the background; /readyz says when)",
                source, settings.host, settings.port, settings.probe_port)
    failure = run_server(settings, lambda: load(bundle, source, champion, None), log_level=log_level,
                         access_log=access_log, follower=follower)
    if failure:
        raise ModelError(f"the model could not be loaded, the server stopped: {failure}")


def _has_versions(url: str, opts: dict) -> bool:
    try:
        return bool(Registry(url, opts).names())
    except (FruitdaskError, OSError):  # no listing allowed: the bundle's own error is the one to show
        return False


def _first_bundle(url: str, opts: dict, bundle_location: bool) -> ModelBundle:
    """The bundle to serve first; a registry with versions but no champion yet says so."""
    try:
        return ModelBundle.load(url, opts)
    except ModelError as e:
        if bundle_location and _has_versions(url, opts):
            raise ModelError(f"{url!r} is a model registry with no champion yet (no {CHAMPION}): promote a version "
                             f"with `fruitdask model promote {url} VERSION` (see `fruitdask model list {url}`)") from e
        raise


def run_server(settings: ServeSettings, load: Callable[[], Predictor], *, log_level: str = "info",
               access_log: bool = False, follower: follow.Follower | None = None) -> str | None:
    """Serve until SIGTERM/SIGINT (exit after the drain) or a failed load; return its reason.
    A port that cannot be opened raises :class:`FruitdaskError`."""
    failure: list[str] = []
    servers: Servers | None = None

    def on_load_failure(reason: str) -> None:
        failure.append(reason)
        if servers is not None:
            servers.exit_now()

    app = create_app(settings, load, on_load_failure, follower)
    servers = Servers(app, create_probe_app(app.state.serve), log_level=log_level, access_log=access_log)
    servers.run()
    if servers.error:
        raise FruitdaskError(servers.error)
    return failure[0] if failure else None
