"""The public Starlette application: routes, request limits, JSON errors, background model load.

Every refusal is a JSON body ``{"error": CODE, "reason": SENTENCE}`` with a 4xx status
(429 past a client's uploads in flight, 503 while the model loads or the queue, the byte
budget or the decode threads are full): a bad request never takes the server down, and the
model runs only on bodies that decoded into an image. The probes and the
metrics are another application on another port (:mod:`fruitdask.serve.probes`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fruitdask.features.featurize import DecodeError
from fruitdask.serve import answer, page
from fruitdask.serve.batcher import MicroBatcher, Overloaded
from fruitdask.serve.limits import BudgetTimeout, Reservation, TooManyUploads, client_key, parse_top
from fruitdask.serve.metrics import MetricsMiddleware, ServeMetrics
from fruitdask.serve.predictor import Predictor
from fruitdask.serve.probes import PROBE_ENDPOINTS
from fruitdask.serve.settings import PART_IMAGE_TYPES, RAW_IMAGE_TYPES, ServeSettings
from fruitdask.serve.state import ApiError, ServeState, json_error

if TYPE_CHECKING:
    from fruitdask.serve.follow import Follower

logger = logging.getLogger(__name__)

#: First bytes of the formats the API takes (checked before PIL sees the body).
SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}
ENDPOINTS = ("/v1/predict", "/v1/model", *PROBE_ENDPOINTS)


# --- reading the request --------------------------------------------------------------


async def read_body(request: Request, settings: ServeSettings, held: Reservation) -> bytes:
    """The body, refused with 413 past ``max_body_bytes`` (from Content-Length before any byte
    is read, else while streaming a chunked body) and with 408 past ``body_timeout_s``.

    Its bytes are taken from the budget of bytes in flight (``held``) as they arrive, chunk
    by chunk, never from the Content-Length: a client that declares 8 MiB and sends nothing
    holds nothing of the budget (issue #31 item 7)."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, "bad_content_length", f"Content-Length {declared!r} is not a byte count")
        if int(declared) > limit:
            raise ApiError(413, "body_too_large", f"the body is {int(declared):,} bytes, over the {limit:,}-byte limit: "
                           "send a smaller photo (a few hundred kB is plenty: the model sees it at a few hundred pixels)")
    chunks, size = [], 0
    deadline = time.monotonic() + settings.body_timeout_s
    try:
        with anyio.fail_after(settings.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, "body_too_large", f"the body grew past the {limit:,}-byte limit while streaming: "
                                   "send a smaller photo")
                # The budget's wait ends just before the body's own deadline: 503 busy, not 408.
                await _take(held, len(chunk), max(0.0, deadline - time.monotonic() - 0.05))
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(408, "body_timeout", f"the body did not arrive within {settings.body_timeout_s:g} s "
                       f"({size:,} bytes received): send it at once") from None
    return b"".join(chunks)


async def _take(held: Reservation, n: int, timeout: float) -> None:
    try:
        await held.take(n, timeout)
    except BudgetTimeout as e:
        raise ApiError(503, "busy", f"{e}: retry shortly", headers={"Retry-After": "1"}) from e


async def _one_chunk(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


async def image_bytes(request: Request, settings: ServeSettings, held: Reservation) -> bytes:
    """The image of a raw ``image/jpeg|png`` body or of a multipart ``image`` field."""
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in (*RAW_IMAGE_TYPES, "multipart/form-data"):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {content_type or '(none)'!r} is not accepted: send the photo as the body with "
                       f"Content-Type {' or '.join(RAW_IMAGE_TYPES)}, or as the multipart/form-data field 'image'")
    body = await read_body(request, settings, held)
    if media != "multipart/form-data":
        return body
    await _take(held, len(body), settings.body_timeout_s)  # the part is a copy of the body's bytes
    parser = MultiPartParser(request.headers, _one_chunk(body), max_files=1, max_fields=16,
                             max_part_size=settings.max_body_bytes)
    try:
        form = await parser.parse()
    except (MultiPartException, KeyError, ValueError) as e:
        raise ApiError(400, "bad_multipart", f"the multipart body could not be parsed ({getattr(e, 'message', e)}): "
                       "send curl -F image=@photo.jpg") from e
    try:
        part = form.get("image")
        if part is None:
            raise ApiError(400, "missing_image_field", f"the multipart body has no 'image' field (fields: {sorted(form.keys())}): "
                           "send curl -F image=@photo.jpg")
        if not isinstance(part, UploadFile):
            raise ApiError(400, "image_not_a_file", "the 'image' field is a text field: send it as a file, curl -F image=@photo.jpg")
        part_type = (part.content_type or "").split(";", 1)[0].strip().lower()
        if part_type not in PART_IMAGE_TYPES:
            raise ApiError(415, "unsupported_media_type",
                           f"the 'image' part has Content-Type {part.content_type!r}: send a JPEG or PNG photo")
        return await part.read()
    finally:
        await form.close()


def check_signature(data: bytes) -> None:
    """Refuse an empty body, or one that is neither JPEG nor PNG, before decoding."""
    if not data:
        raise ApiError(400, "empty_body", "the request has no body: send the photo's bytes (curl --data-binary @photo.jpg)")
    if not any(data.startswith(sig) for sig in SIGNATURES):
        raise ApiError(400, "not_an_image", f"the body ({len(data):,} bytes, starting {data[:8]!r}) is not a JPEG or PNG image")


def decode_error(e: DecodeError) -> ApiError:
    """A decode failure as an API error: decompression bombs are 413, the rest 400."""
    reason = str(e)
    if "decompression bomb" in reason:  # both of featurize.open_image's bomb messages say so
        return ApiError(413, "decompression_bomb", reason)
    return ApiError(400, "undecodable_image", reason)


def top_of(request: Request, settings: ServeSettings, n_labels: int) -> int:
    raw = request.query_params.get("top")
    top = parse_top(raw, settings.default_top, n_labels)
    if top is None:
        shown = raw if raw is None or len(raw) <= 20 else raw[:20] + "…"
        raise ApiError(400, "bad_top", f"top={shown!r} is not usable: pass a whole number from 1 to {n_labels}")
    return top


# --- handlers -------------------------------------------------------------------------


def _state(request: Request) -> ServeState:
    return request.app.state.serve


def claim_upload(request: Request, state: ServeState) -> str:
    """Count the request against its client (:func:`client_key`); 429 past ``--max-uploads-per-client``.
    Returns the key to give back with ``state.uploads.release``."""
    peer = request.client.host if request.client else None
    key = client_key(peer, ",".join(request.headers.getlist("x-forwarded-for")), state.settings.trusted_proxies)
    try:
        state.uploads.claim(key)
    except TooManyUploads as e:
        raise ApiError(429, "too_many_uploads", f"{e}: wait for an answer before sending more",
                       headers={"Retry-After": "1"}) from e
    return key


async def decode(state: ServeState, predictor: Predictor, data: bytes):
    """``predictor.decode`` in one of the ``--decode-threads``; 503 ``decode_busy`` if none frees
    up within ``--decode-timeout`` (the wait is bounded, as the body's is)."""
    limiter, timeout = state.decode_limiter, state.settings.decode_timeout_s
    try:
        with anyio.fail_after(timeout):
            await limiter.acquire()
    except TimeoutError:
        raise ApiError(503, "decode_busy", f"all {limiter.total_tokens:g} decode threads stayed busy for {timeout:g} s "
                       "(--decode-timeout): retry shortly", headers={"Retry-After": "1"}) from None
    try:
        # The token above is the bound: anyio's default pool (40 threads) is never the limit here.
        return await anyio.to_thread.run_sync(predictor.decode, data)
    except DecodeError as e:
        raise decode_error(e) from e
    finally:
        limiter.release()


async def received_image(request: Request, state: ServeState, predictor: Predictor):
    """The request's photo, decoded: its bytes held in the budget only until it is decoded."""
    async with state.budget.reservation() as held:
        data = await image_bytes(request, state.settings, held)
        check_signature(data)
        return await decode(state, predictor, data)


async def predict(request: Request) -> Response:
    start = time.perf_counter()
    lang = language(request)
    state = _state(request)
    if not state.ready:
        raise state.not_ready()
    # The model is read once here (the photo is decoded at its size); the batcher says which
    # model computed the answer: this one, or the champion that replaced it meanwhile.
    predictor, batcher = state.predictor, state.batcher
    assert predictor is not None and batcher is not None
    try:
        top = top_of(request, state.settings, len(predictor.bundle.labels))
        client = claim_upload(request, state)
    except ApiError as e:
        state.metrics.rejected.labels(e.error).inc()
        raise
    try:  # the client's upload counts until its answer: reading, decoding and the model's queue
        try:
            image = await received_image(request, state, predictor)
        except ApiError as e:
            state.metrics.rejected.labels(e.error).inc()
            raise
        try:
            scores, predictor = await batcher.submit_to_model(image, predictor)
        except Overloaded as e:
            raise ApiError(503, "overloaded", f"{e}: retry shortly", headers={"Retry-After": "1"}) from e
    finally:
        state.uploads.release(client)
    return JSONResponse({
        **answer.respond(predictor, scores, top, lang),
        "model": predictor.summary(),
        "elapsed_ms": round(1000 * (time.perf_counter() - start), 2),
    })


async def model_info(request: Request) -> Response:
    state = _state(request)
    if not state.ready:
        raise state.not_ready()
    assert state.predictor is not None
    s = state.settings
    return JSONResponse({**state.predictor.describe(),
                         "batching": {"max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms, "max_queue": s.max_queue},
                         "limits": {"max_body_bytes": s.max_body_bytes, "max_pixels": s.max_pixels,
                                    "body_timeout_s": s.body_timeout_s, "max_uploads_per_client": s.max_uploads_per_client,
                                    "accepted": [*RAW_IMAGE_TYPES, "multipart/form-data"]}})


async def _api_error(request: Request, exc: ApiError) -> Response:
    return json_error(exc.status, exc.error, exc.reason, exc.headers)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    return json_error(exc.status_code, "http_" + str(exc.status_code), str(exc.detail), exc.headers)


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    return json_error(400, "client_disconnected", "the client closed the connection before sending the whole body")


# --- the application ------------------------------------------------------------------


def create_app(settings: ServeSettings, load: Callable[[], Predictor], on_load_failure: Callable[[str], None] | None = None,
               follower: Follower | None = None) -> Starlette:
    """The ASGI application.

    Parameters
    ----------
    load
        Loads the model (TensorFlow import, weights, graph): seconds to minutes. It runs in
        a thread after start-up, so ``/healthz`` answers at once and ``/readyz`` says 503
        until it returns.
    on_load_failure
        Called with the reason when ``load`` raises (the CLI stops the server: exit 1).
    follower
        Follows the registry's champion once the first model serves (a registry location).
    """
    state = ServeState(settings, ServeMetrics(ENDPOINTS))
    following: list[asyncio.Task] = []

    async def load_in_background() -> None:
        try:
            predictor = await anyio.to_thread.run_sync(load, abandon_on_cancel=True)
        except Exception as e:
            state.load_error = f"{type(e).__name__}: {e}" if not str(e) else str(e)
            logger.exception("the model could not be loaded")  # the reason: the log and the probe port only
            if on_load_failure is not None:
                on_load_failure(state.load_error)
            return
        start_serving(state, predictor)
        if follower is not None:
            state.following = follower.registry.url
            following.append(asyncio.get_running_loop().create_task(follower.run(state), name="fruitdask-follow"))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(load_in_background(), name="fruitdask-load-model")
        try:
            yield
        finally:
            for t in (task, *following):
                if not t.done():
                    t.cancel()
            if state.batcher is not None:
                await state.batcher.stop()

    app = Starlette(
        routes=[
            Route("/v1/predict", predict, methods=["POST"]),
            Route("/v1/model", model_info, methods=["GET"]),
        ],
        # Starlette types each handler as taking any Exception; each of these takes its own class.
        exception_handlers={ApiError: _api_error, HTTPException: _http_error, ClientDisconnect: _client_gone},  # type: ignore[dict-item]
        lifespan=lifespan,
    )
    app.state.serve = state
    app.router.routes.extend(page.routes())  # the public page at / (issue #24)
    state.metrics.endpoints |= frozenset(page.PATHS)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    return app


def start_serving(state: ServeState, predictor: Predictor) -> None:
    """The first model serves: the batcher starts, readiness and the model's metrics are set."""
    settings = state.settings
    state.predictor = predictor
    # One model per batch: the reference is read once per batch, on the event loop.
    batcher = MicroBatcher(_scores, current=lambda: state.predictor, fits=_same_input,
                           max_batch=settings.max_batch, max_wait_s=settings.max_wait_ms / 1000,
                           max_queue=settings.max_queue, on_batch=state.metrics.observe_batch)
    batcher.start()
    state.batcher = batcher
    state.metrics.ready.set(1)
    state.metrics.load_seconds.set(predictor.load_seconds)
    state.metrics.serving(predictor.version, predictor.promoted_at)
    logger.info("ready: POST http://%s:%d/v1/predict", settings.host, settings.port)


def _scores(predictor: Predictor, images):
    return predictor.predict_scores(images)


def _same_input(model: Predictor, prepared_for: Predictor) -> bool:
    """A photo decoded for one model can be computed by another of the same input size."""
    return model.image_size == prepared_for.image_size and model.max_pixels == prepared_for.max_pixels


def language(request: Request) -> str:
    """``?lang=fr|en``, else ``Accept-Language``, else English (:func:`answer.negotiate`)."""
    try:
        return answer.negotiate(request.query_params.get("lang"), request.headers.get("accept-language"))[0]
    except answer.BadLanguage as e:
        raise ApiError(400, "bad_lang", str(e)) from e
