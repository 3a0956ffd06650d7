"""The probe application: ``/healthz``, ``/readyz``, ``/metrics`` and ``/drain`` on a port of
their own (``--probe-port``).

The public port has a connection cap (``--max-connections``): 1,024 slow clients filled it
and the kubelet's liveness probe failed with them, restarting healthy pods. Here no cap
applies, and the chart admits only the kubelet and the monitoring namespace to this port,
so the load-failure reason (which can name buckets and hashes) is said here and not on the
public port. ``/drain`` stops the process, so it answers only the loopback address (the
chart's preStop hook is an ``exec`` inside the pod).
"""

from __future__ import annotations

import ipaddress

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fruitdask.serve.metrics import MetricsMiddleware
from fruitdask.serve.state import ServeState, drain, json_error

PROBE_ENDPOINTS = ("/healthz", "/readyz", "/metrics", "/drain")


def _state(request: Request) -> ServeState:
    return request.app.state.serve


async def healthz(request: Request) -> Response:
    """Liveness: the process answers. A model that failed to load fails it too (restart)."""
    state = _state(request)
    if state.load_error:
        return json_error(503, "model_failed", state.load_error)
    return JSONResponse({"status": "ok", **model_status(state)})


def model_status(state: ServeState) -> dict:
    """The served version, the registry followed and why the last new champion was refused:
    a champion that fails to load leaves the old one serving, so liveness and readiness stay
    green and say why here."""
    p = state.predictor
    return {"version": p.version if p is not None else None, "following": state.following,
            "last_switch_error": state.switch_error}


async def readyz(request: Request) -> Response:
    """Readiness: 200 once the model is loaded and the batcher runs, until the drain begins."""
    state = _state(request)
    if state.draining_since is not None:
        return json_error(503, "draining", "the server is shutting down: send requests to another replica")
    if not state.ready:
        e = state.not_ready(public=False)
        return json_error(e.status, e.error, e.reason, e.headers)
    assert state.predictor is not None
    return JSONResponse({"status": "ready", "load_seconds": round(state.predictor.load_seconds, 3), **model_status(state)})


async def metrics(request: Request) -> Response:
    state = _state(request)
    state.metrics.queue_depth.set(state.batcher.depth if state.batcher else 0)
    state.metrics.inflight_bytes.set(state.budget.used)
    body, content_type = state.metrics.exposition()
    return Response(body, media_type=content_type)


async def drain_endpoint(request: Request) -> Response:
    """The preStop hook, from inside the pod: the process stops. Readiness fails, requests are
    served for ``--drain-seconds``, then this answers, the API port closes, open requests
    finish and the process exits 0. A drain is never undone: a pod drained by mistake exits
    and Kubernetes restarts it (issue #31 item 8).

    Only from the loopback address (the chart's ``exec`` hook): over the network, 403."""
    state = _state(request)
    peer = request.client.host if request.client else ""
    if not is_loopback(peer):
        return json_error(403, "drain_local_only", "GET /drain is taken only from inside the pod (127.0.0.1 or ::1): "
                          "use the pod's preStop hook, or delete the pod")
    if state.request_stop is not None:
        state.request_stop()
    await drain(state)
    return JSONResponse({"status": "drained", "exiting": state.request_stop is not None})


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)  # IPv6 only: ::ffff:127.0.0.1 is loopback too
    return ip.is_loopback or bool(mapped is not None and mapped.is_loopback)


def create_probe_app(state: ServeState) -> Starlette:
    """The probe application over the public application's ``state`` (``app.state.serve``)."""
    app = Starlette(routes=[
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/drain", drain_endpoint, methods=["GET"]),
    ])
    app.state.serve = state
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app
