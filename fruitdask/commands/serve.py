"""``fruitdask serve``: flags, region guard, bundle, then uvicorn until SIGTERM/Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from fruitdask.commands.options import add_quiet_debug, add_storage_options, storage_settings
from fruitdask.serve.settings import ServeSettings

logger = logging.getLogger(__name__)

_D = ServeSettings()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR_OR_URI", help="a model bundle written by `fruitdask train --model-out`")
    p.add_argument("--weights", metavar="PATH_OR_URI",
                   help="where the model's weights file is now, if it moved (its sha256 must match the bundle)")
    p.add_argument("--host", default=_D.host, help=f"address to listen on (default: {_D.host}; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=_D.port, help=f"TCP port (default: {_D.port})")
    g = p.add_argument_group("batching")
    g.add_argument("--max-batch", type=int, default=_D.max_batch, help=f"most images per VGG16 call (default: {_D.max_batch})")
    g.add_argument("--max-wait-ms", type=float, default=_D.max_wait_ms,
                   help=f"how long a request waits for others to share its VGG16 call (default: {_D.max_wait_ms:g})")
    g.add_argument("--max-queue", type=int, default=_D.max_queue,
                   help=f"requests waiting for the model beyond this get 503 (default: {_D.max_queue})")
    g.add_argument("--threads", type=int, default=None, help="TensorFlow intra-op threads (default: all cores)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-body-bytes", type=int, default=_D.max_body_bytes,
                   help=f"largest request body; larger ones get 413 (default: {_D.max_body_bytes:,})")
    g.add_argument("--max-pixels", type=int, default=_D.max_pixels,
                   help=f"largest image, width x height (decompression bombs get 413; default: {_D.max_pixels:,})")
    g.add_argument("--body-timeout", type=float, default=_D.body_timeout_s,
                   help=f"seconds to receive a body once its headers came; then 408 (default: {_D.body_timeout_s:g})")
    g.add_argument("--header-timeout", type=float, default=_D.header_timeout_s,
                   help=f"seconds to receive the request headers; then the connection is closed (default: {_D.header_timeout_s:g})")
    g.add_argument("--keep-alive", type=int, default=_D.keep_alive_s,
                   help=f"seconds an idle keep-alive connection stays open (default: {_D.keep_alive_s})")
    g.add_argument("--max-connections", type=int, default=_D.max_connections,
                   help=f"open connections and requests beyond this get 503 (default: {_D.max_connections})")
    g.add_argument("--top", type=int, default=_D.default_top, help=f"labels per answer without ?top= (default: {_D.default_top})")
    add_storage_options(p)
    add_quiet_debug(p)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    return ServeSettings(
        host=args.host, port=args.port, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels, body_timeout_s=args.body_timeout,
        header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive, max_connections=args.max_connections,
        default_top=args.top, threads=args.threads,
    )


def command(args: argparse.Namespace) -> int:
    from fruitdask.errors import FruitdaskError, ModelError

    try:
        import uvicorn

        from fruitdask.serve.app import create_app
    except ImportError as e:
        raise FruitdaskError(f"`fruitdask serve` needs the serve extra ({e.name} is missing): "
                             "pip install 'fruitdask[serve]'") from e

    from fruitdask import storage
    from fruitdask.classifier.bundle import ModelBundle
    from fruitdask.serve.predictor import Predictor
    from fruitdask.serve.protocol import header_timeout_protocol

    settings = settings_from_args(args)
    storage_cfg = storage_settings(args)
    # Before anything is read: the bundle and the weights must live in allowed (EU) regions.
    storage.guard_regions([args.model, args.weights], storage_cfg)
    opts = storage_cfg.storage_options()
    bundle = ModelBundle.load(args.model, opts)  # small JSON + npz: a bad --model fails here, at once
    if bundle.weights.kind == "file" and not args.weights:
        storage.guard_regions([bundle.weights.source], storage_cfg)

    def load() -> Predictor:
        return Predictor.load(bundle, args.model, opts, weights_override=args.weights, max_pixels=settings.max_pixels,
                              threads=settings.threads, warm_batches=(1, settings.max_batch))

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_failure(reason: str) -> None:
        failure.append(reason)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, load, on_load_failure)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, http=header_timeout_protocol(settings.header_timeout_s),
        lifespan="on", timeout_keep_alive=settings.keep_alive_s, limit_concurrency=settings.max_connections,
        timeout_graceful_shutdown=30, log_level="warning" if args.quiet else "info", access_log=bool(args.debug),
        server_header=False,
    )
    server = uvicorn.Server(config)
    logger.info("serving %s on http://%s:%d (the model loads in the background; /readyz says when)",
                args.model, settings.host, settings.port)
    with _stop_quietly():
        server.run()
    if failure:
        raise ModelError(f"the model could not be loaded, the server stopped: {failure[0]}")
    return 0


class _stop_quietly:
    """SIGTERM and Ctrl-C are how a server is stopped: uvicorn drains the connections, and
    re-raises the signal afterwards; handle it here so the exit is 0, not 143/130."""

    def __enter__(self) -> None:
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.saved[sig] = signal.signal(sig, lambda s, f: None)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
