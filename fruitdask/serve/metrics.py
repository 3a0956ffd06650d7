"""Prometheus metrics of the server, in a registry of its own (one per application)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ServeMetrics:
    """Requests by endpoint and status, latency, batch sizes, queue depth, readiness."""

    def __init__(self, endpoints: Iterable[str]) -> None:
        self.endpoints = frozenset(endpoints)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("fruitdask_serve_requests", "HTTP requests by endpoint, method and status code",
                                ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("fruitdask_serve_request_duration_seconds", "Time from request to response, by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("fruitdask_serve_batch_size", "Images per VGG16 call", buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("fruitdask_serve_inference_duration_seconds", "Seconds per VGG16 + classifier call",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.rejected = Counter("fruitdask_serve_rejected_images", "Requests refused before the model, by error",
                                ["error"], registry=r)
        self.queue_depth = Gauge("fruitdask_serve_queue_depth", "Images waiting for the model", registry=r)
        self.inflight_bytes = Gauge("fruitdask_serve_inflight_bytes",
                                    "Bytes of request bodies received and held (--max-inflight-bytes)", registry=r)
        self.ready = Gauge("fruitdask_serve_ready", "1 once the model is loaded and serving", registry=r)
        self.load_seconds = Gauge("fruitdask_serve_model_load_seconds", "Seconds the model took to load", registry=r)
        self.model_info = Gauge("fruitdask_model_info", "1 for the registry version being served", ["version"], registry=r)
        self.switch_timestamp = Gauge("fruitdask_model_switch_timestamp_seconds",
                                      "Unix time the served model last changed (its first load included)", registry=r)
        self.switch_failures = Counter("fruitdask_model_switch_failures",
                                       "New champions that could not be loaded (the old one serves on)", registry=r)
        # Registered once a champion is served (a bundle location has none): no sample, no alert.
        self.champion_age = Gauge("fruitdask_model_champion_age_seconds",
                                  "Seconds since the served champion was promoted (champion.json's promoted_at)", registry=None)
        self._version: str | None = None
        self._promoted_at: float | None = None

    def endpoint(self, path: str) -> str:
        """The path as a label: known routes by name, anything else as ``other`` (bounded cardinality)."""
        return path if path in self.endpoints else "other"

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference.observe(seconds)

    def serving(self, version: str | None, promoted_at: float | None) -> None:
        """The served model changed (or was loaded): its version, the switch time, its age."""
        if self._version is not None:
            self.model_info.remove(self._version)
        if version is not None:
            self.model_info.labels(version).set(1)
        self._version = version
        self.switch_timestamp.set(time.time())
        if promoted_at is not None and self._promoted_at is None:
            self.registry.register(self.champion_age)
            self.champion_age.set_function(lambda: time.time() - self._promoted_at if self._promoted_at else 0.0)
        self._promoted_at = promoted_at if promoted_at is not None else self._promoted_at

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Pure ASGI middleware: counts every HTTP response by status and times it."""

    def __init__(self, app, metrics: ServeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = self.metrics.endpoint(scope["path"])
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(endpoint, method, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
