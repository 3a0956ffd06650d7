"""The frozen settings of one ``fruitdask serve`` process, built once by the CLI."""

from __future__ import annotations

from dataclasses import dataclass

from fruitdask.errors import ConfigError
from fruitdask.serve.limits import Network

#: The service's ``--max-pixels`` (4096 x 4096): a photo decodes in at most about 160 MiB.
#: The pipeline's own limit (64 MP) is for trusted files; this one is for the public's.
#: JPEGs are counted as decoded: a 48 MP phone photo decodes at 1/8 scale, 0.75 MP.
SERVE_MAX_PIXELS = 4096 * 4096

#: Media types ``POST /v1/predict`` takes as a raw body (the image bytes themselves).
RAW_IMAGE_TYPES = ("image/jpeg", "image/png")
#: What a multipart ``image`` part may call itself (curl -F sends the file's type).
PART_IMAGE_TYPES = (*RAW_IMAGE_TYPES, "application/octet-stream", "")


@dataclass(frozen=True)
class ServeSettings:
    """Limits, batching and timeouts of the server (``fruitdask serve --help``)."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: Port of ``/healthz``, ``/readyz``, ``/metrics`` and ``/drain``: outside ``max_connections``.
    probe_port: int = 8081
    #: Seconds between failing readiness (preStop ``/drain`` or SIGTERM) and closing the port.
    drain_seconds: float = 15.0
    #: Most images in one VGG16 call.
    max_batch: int = 32
    #: How long the first request of a batch waits for company, in milliseconds.
    max_wait_ms: float = 5.0
    #: Requests waiting for the model beyond this get 503 (back-pressure, not a growing queue).
    max_queue: int = 512
    #: Largest request body: refused from Content-Length before reading, or while streaming.
    max_body_bytes: int = 10 * 2**20
    #: Largest image in pixels (width x height, from the header): decompression bombs.
    max_pixels: int = SERVE_MAX_PIXELS
    #: Decodes running at once (about the cores): each may take ~10 bytes per pixel.
    decode_threads: int = 2
    #: Seconds a decoded request waits for one of the ``decode_threads`` (then 503 ``decode_busy``).
    decode_timeout_s: float = 10.0
    #: Bytes of request bodies held at once across all requests, counted as they arrive; more wait (then 503).
    max_inflight_bytes: int = 64 * 2**20
    #: Uploads in flight from one client (its address, see ``trusted_proxies``); more get 429.
    max_uploads_per_client: int = 4
    #: Proxies (the ingress) whose ``X-Forwarded-For`` names the client; empty: the peer address is the client.
    trusted_proxies: tuple[Network, ...] = ()
    #: Seconds a client may take to send its body once the headers arrived (408 after).
    body_timeout_s: float = 10.0
    #: Seconds a client may take to send its request headers (connection closed after).
    header_timeout_s: float = 10.0
    #: Seconds an idle keep-alive connection is kept (uvicorn ``timeout_keep_alive``).
    keep_alive_s: int = 5
    #: Open connections + in-flight requests beyond this get 503 from uvicorn.
    max_connections: int = 1024
    #: Labels returned when the request has no ``?top=``.
    default_top: int = 3
    #: TensorFlow intra-op threads (default: TensorFlow's, all cores).
    threads: int | None = None
    #: Seconds between two reads of a registry's champion alias (a bundle location is not polled).
    model_poll_s: float = 60.0

    def __post_init__(self) -> None:
        checks = [
            ("--port", self.port, 0 <= self.port <= 65535, "a TCP port 0-65535"),
            ("--probe-port", self.probe_port, 0 <= self.probe_port <= 65535 and (self.probe_port != self.port or self.port == 0),
             "a TCP port 0-65535 other than --port"),
            ("--drain-seconds", self.drain_seconds, self.drain_seconds >= 0, "0 or more seconds"),
            ("--decode-threads", self.decode_threads, self.decode_threads >= 1, "at least 1"),
            ("--decode-timeout", self.decode_timeout_s, self.decode_timeout_s > 0, "more than 0 seconds"),
            ("--max-uploads-per-client", self.max_uploads_per_client, self.max_uploads_per_client >= 1, "at least 1"),
            # A multipart body counts twice (the part is a copy): it must fit.
            ("--max-inflight-bytes", self.max_inflight_bytes, self.max_inflight_bytes >= 2 * self.max_body_bytes,
             "at least twice --max-body-bytes"),
            ("--max-batch", self.max_batch, self.max_batch >= 1, "at least 1"),
            ("--max-wait-ms", self.max_wait_ms, self.max_wait_ms >= 0, "0 or more"),
            ("--max-queue", self.max_queue, self.max_queue >= self.max_batch, "at least --max-batch"),
            ("--max-body-bytes", self.max_body_bytes, self.max_body_bytes >= 1024, "at least 1024"),
            ("--max-pixels", self.max_pixels, self.max_pixels >= 32 * 32, "at least 1024 (32 x 32)"),
            ("--body-timeout", self.body_timeout_s, self.body_timeout_s > 0, "more than 0 seconds"),
            ("--header-timeout", self.header_timeout_s, self.header_timeout_s > 0, "more than 0 seconds"),
            ("--keep-alive", self.keep_alive_s, self.keep_alive_s >= 1, "at least 1 second"),
            ("--max-connections", self.max_connections, self.max_connections >= 1, "at least 1"),
            ("--top", self.default_top, self.default_top >= 1, "at least 1"),
            ("--threads", self.threads, self.threads is None or self.threads >= 1, "at least 1"),
            ("--model-poll-seconds", self.model_poll_s, self.model_poll_s > 0, "more than 0 seconds"),
        ]
        for flag, value, ok, want in checks:
            if not ok:
                raise ConfigError(f"{flag} {value!r} is not usable: pass {want}")
