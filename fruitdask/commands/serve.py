"""``fruitdask serve``: its flags and the settings sized from them, then :func:`fruitdask.serve.runner.serve_bundle`
(a bundle, or a registry's champion, followed)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from fruitdask.commands.options import add_quiet_debug, add_storage_options, storage_settings
from fruitdask.config import StorageSettings
from fruitdask.serve.limits import parse_networks, plan_for_memory
from fruitdask.serve.settings import ServeSettings

_D = ServeSettings()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR_OR_URI",
                   help="a model bundle written by `fruitdask train --model-out`, or a model registry (`--models`, a "
                   "folder holding champion.json): its champion is served and followed")
    p.add_argument("--model-poll-seconds", type=float, default=_D.model_poll_s,
                   help=f"with a registry: seconds between two reads of its champion alias (SIGHUP reads it at once); "
                   f"a new champion is loaded in the background and swapped in between requests "
                   f"(default: {_D.model_poll_s:g})")
    p.add_argument("--weights", metavar="PATH_OR_URI",
                   help="where the model's weights file is now, if it moved (its sha256 must match the bundle)")
    p.add_argument("--host", default=_D.host, help=f"address to listen on (default: {_D.host}; 0.0.0.0 in a container)")
    p.add_argument("--port", type=int, default=_D.port, help=f"TCP port of the API (default: {_D.port})")
    p.add_argument("--probe-port", type=int, default=_D.probe_port,
                   help=f"TCP port of /healthz, /readyz, /metrics and /drain, outside --max-connections; keep it "
                   f"private (default: {_D.probe_port})")
    p.add_argument("--drain-seconds", type=float, default=_D.drain_seconds,
                   help=f"on SIGTERM (or GET /drain from 127.0.0.1), seconds readiness fails while requests are still "
                   f"served, before the API port closes and the process exits (default: {_D.drain_seconds:g})")
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
                   help=f"largest image decoded, width x height (JPEGs at their decoded scale); larger ones get 413 "
                   f"(default: {_D.max_pixels:,})")
    g.add_argument("--decode-threads", type=int, default=None,
                   help="decodes at once, each up to ~10 bytes per --max-pixels pixel (default: the usable cores, at most 8)")
    g.add_argument("--decode-timeout", type=float, default=_D.decode_timeout_s,
                   help=f"seconds a request waits for a free decode thread; then 503 decode_busy "
                   f"(default: {_D.decode_timeout_s:g})")
    g.add_argument("--max-inflight-bytes", type=int, default=None,
                   help=f"bytes of request bodies held at once across requests, counted as they arrive; more wait, "
                   f"then 503 (default: from --memory-limit, else {_D.max_inflight_bytes:,})")
    g.add_argument("--max-uploads-per-client", type=int, default=_D.max_uploads_per_client,
                   help=f"uploads in flight from one client address; more get 429 (default: {_D.max_uploads_per_client})")
    g.add_argument("--trusted-proxies", default="", metavar="CIDRS",
                   help="comma-separated CIDRs of the proxies in front (the ingress): a request from one of them "
                   "counts against the first address of X-Forwarded-For, from the right, outside these CIDRs "
                   "(default: none; X-Forwarded-For is ignored)")
    g.add_argument("--memory-limit", type=int, default=None, metavar="BYTES",
                   help="the container's memory limit: sizes --max-connections and --max-inflight-bytes to fit it "
                   "(the chart passes limits.memory)")
    g.add_argument("--body-timeout", type=float, default=_D.body_timeout_s,
                   help=f"seconds to receive a body once its headers came; then 408 (default: {_D.body_timeout_s:g})")
    g.add_argument("--header-timeout", type=float, default=_D.header_timeout_s,
                   help=f"seconds to receive the request headers; then the connection is closed (default: {_D.header_timeout_s:g})")
    g.add_argument("--keep-alive", type=int, default=_D.keep_alive_s,
                   help=f"seconds an idle keep-alive connection stays open (default: {_D.keep_alive_s})")
    g.add_argument("--max-connections", type=int, default=None,
                   help=f"open connections and requests on the API port beyond this get 503 "
                   f"(default: from --memory-limit, else {_D.max_connections})")
    g.add_argument("--top", type=int, default=_D.default_top, help=f"labels per answer without ?top= (default: {_D.default_top})")
    add_storage_options(p)
    add_quiet_debug(p)


def settings_from_args(args: argparse.Namespace) -> ServeSettings:
    """The frozen settings; what is not given is sized from ``--memory-limit`` and the cores."""
    decode_threads = args.decode_threads or min(8, len(os.sched_getaffinity(0)))
    max_connections, inflight = _D.max_connections, _D.max_inflight_bytes
    if args.memory_limit is not None:
        plan = plan_for_memory(args.memory_limit, max_pixels=args.max_pixels, max_body_bytes=args.max_body_bytes,
                               decode_threads=decode_threads)
        max_connections, inflight = plan.max_connections, plan.max_inflight_bytes
    return ServeSettings(
        host=args.host, port=args.port, probe_port=args.probe_port, drain_seconds=args.drain_seconds,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes, max_pixels=args.max_pixels, decode_threads=decode_threads,
        decode_timeout_s=args.decode_timeout, max_uploads_per_client=args.max_uploads_per_client,
        trusted_proxies=parse_networks(args.trusted_proxies),
        max_inflight_bytes=args.max_inflight_bytes or max(inflight, 2 * args.max_body_bytes), body_timeout_s=args.body_timeout,
        header_timeout_s=args.header_timeout, keep_alive_s=args.keep_alive,
        max_connections=args.max_connections or max_connections, default_top=args.top, threads=args.threads,
        model_poll_s=args.model_poll_seconds,
    )


@dataclass(frozen=True)
class ServeOptions:
    """What ``fruitdask serve`` was asked, typed: the model's location, the server's frozen
    :class:`ServeSettings` (sized from the flags), storage and logging."""

    model: str
    settings: ServeSettings
    storage: StorageSettings
    weights: str | None = None
    quiet: bool = False
    debug: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeOptions:
        return cls(model=args.model, settings=settings_from_args(args), storage=storage_settings(args),
                   weights=args.weights, quiet=bool(args.quiet), debug=bool(args.debug))


def command(args: argparse.Namespace) -> int:
    return serve(ServeOptions.from_args(args))


def serve(opts: ServeOptions) -> int:
    """Serve the model until SIGTERM, SIGINT or a drain; return 0."""
    from fruitdask.errors import FruitdaskError

    try:
        import uvicorn  # noqa: F401 - the extra's packages first: the runner may already be imported

        from fruitdask.serve import runner
    except ImportError as e:
        raise FruitdaskError(f"`fruitdask serve` needs the serve extra ({e.name} is missing): "
                             "pip install 'fruitdask[serve]'") from e

    runner.serve_bundle(opts.model, opts.weights, opts.settings, opts.storage,
                        log_level="warning" if opts.quiet else "info", access_log=opts.debug)
    return 0
