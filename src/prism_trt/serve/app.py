"""The HTTP inference server: a Starlette app speaking KServe v2 / Open Inference Protocol over
one :class:`~prism_trt.runtime.api.Executor`, with dynamic batching and Prometheus metrics.

The app does not own the executor: whoever made it closes it after the server stops (the
batcher waits for an in-flight batch on shutdown, so closing afterwards is safe).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..engines.modality import Text, Vision
from ..errors import UsageError
from ..runtime.api import Executor, Health, Selector
from .batcher import Batcher, BatcherStopped, InferenceFailed, QueueFull
from .binary import HEADER_LENGTH, byte_count, encode_body
from .kserve import (
    BODY_ALLOWANCE,
    BYTES_PER_VALUE,
    MODEL_VERSION,
    OUTPUT_NAMES,
    KServeRequest,
    ServedModality,
    infer_response,
    load_json,
    server_metadata,
)
from .metrics import CONTENT_TYPE, ServerMetrics
from .protocol import VisionServing
from .request_error import RequestError
from .text_protocol import TextServing
from .triton import model_config, model_statistics, repository_index

log = logging.getLogger(__name__)

DEFAULT_MAX_WAIT_MS = 5.0
# Parsing a full JSON batch or decoding an image takes a core for milliseconds and, for images,
# tens of MB: at most this many at once, the rest wait (their number bounded by the connection limit).
PARSE_CONCURRENCY = 2
DECODE_CONCURRENCY = 2

Handler = Callable[[Request], Awaitable[Response]]

#: The server's side of each modality, by its kind.
SERVED: dict[str, type[ServedModality]] = {Vision.kind: VisionServing, Text.kind: TextServing}


def served_modality(executor: Executor, model_name: str | None = None) -> ServedModality:
    """How the server speaks the executor's model, under ``model_name`` (default the model's own
    name): inputs, metadata, parsing, body limits."""
    modality = executor.manifest.model.modality
    return SERVED[modality.kind](modality, model_name or executor.model_name, executor.max_batch,
                                 executor.buckets.lengths)


def default_max_body_bytes(executor: Executor, encoding: str = "json") -> int:
    """The /infer body limit: a full batch of the model's inputs (max batch x C x H x W values, or
    max batch x N ids and mask values) in ``encoding`` ("json" or "binary", the Triton binary tensor
    extension) and an allowance for the rest of the request."""
    return served_modality(executor).max_body_bytes(encoding)


def default_max_image_bytes(executor: Executor) -> int:
    """The /infer/image body limit: an image file at the pixel cap (:func:`max_image_pixels`); a
    text model has no image endpoint."""
    return served_modality(executor).max_image_bytes()


def check_model_name(name: str) -> None:
    """Refuse a model name no URL path could carry: empty, a slash or space, or one the routes take
    for themselves."""
    if not name or not name.isascii() or not name.isprintable() or any(c in name for c in " /?#%"):
        raise UsageError(f"the model name {name!r} must be non-empty printable ASCII without spaces or / ? # %")
    if name == "stats":  # GET /v2/models/stats is the statistics of every model
        raise UsageError("the model name 'stats' is taken by the statistics endpoint /v2/models/stats; choose another")


def check_token(token: str) -> None:
    """Refuse a bearer token no client could send: empty, or not printable ASCII without spaces."""
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        # HTTP headers arrive as latin-1 text; a token outside printable ASCII could never match
        raise UsageError("the bearer token must be non-empty printable ASCII without spaces")


class _Server:
    def __init__(self, executor: Executor, selector: Selector, token: str | None, max_wait_ms: float,
                 max_body_bytes: int | None, max_queue_images: int | None, max_image_bytes: int | None,
                 model_name: str | None):
        if token is not None:
            check_token(token)
        if model_name is not None:
            check_model_name(model_name)
        for name, value in (("max_body_bytes", max_body_bytes), ("max_image_bytes", max_image_bytes)):
            if value is not None and value <= 0:
                raise UsageError(f"{name} must be positive, got {value}")
        self.executor, self.token = executor, token
        self.served = served_modality(executor, model_name)
        # an explicit body limit holds for both encodings; the defaults follow the model's full batch
        self.body_limits = {encoding: max_body_bytes or self.served.max_body_bytes(encoding)
                            for encoding in BYTES_PER_VALUE}
        self.image_limit = max_image_bytes or self.served.max_image_bytes()
        self.max_pixels = self.served.max_pixels
        self.parse_slots = asyncio.Semaphore(PARSE_CONCURRENCY)
        self.decode_slots = asyncio.Semaphore(DECODE_CONCURRENCY)
        self.model_name = self.served.model_name
        self.metrics = ServerMetrics(executor.max_batch)
        self.batcher = Batcher(executor, selector, max_wait_s=max_wait_ms / 1e3, max_queue_images=max_queue_images,
                               metrics=self.metrics, modality=self.served.modality)

    # ---------------------------------------------------------------- plumbing

    def endpoint(self, name: str, handler: Handler, public: bool = False) -> Handler:
        """Auth (unless public), error-to-JSON mapping and request/error metrics around one route."""

        async def wrapped(request: Request) -> Response:
            try:
                if not public:
                    self._authorize(request)
                response = await handler(request)
            except RequestError as exc:
                response = self.error_response(name, exc)
            except ClientDisconnect:
                response = self.error_response(name, RequestError(400, "client_disconnected",
                                                                  "the client went away mid-request"))
            except Exception as exc:  # a bug answers 500 for this request; the server goes on
                log.exception("%s %s failed", request.method, request.url.path)
                response = self.error_response(name, RequestError(500, "internal", f"internal error: {exc!r}"))
            self.metrics.requests.labels(endpoint=name, code=str(response.status_code)).inc()
            return response

        return wrapped

    def error_response(self, endpoint: str, error: RequestError) -> JSONResponse:
        self.metrics.errors.labels(endpoint=endpoint, code=str(error.status), reason=error.reason).inc()
        level = logging.ERROR if error.status >= 500 else logging.INFO
        log.log(level, "%s -> %d %s: %s", endpoint, error.status, error.reason, error.message)
        return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)

    def count_refusal(self, status: int, reason: str) -> None:
        """A request the HTTP server refused before the app saw it (a slow or oversized head, a stalled body)."""
        self.metrics.requests.labels(endpoint="http", code=str(status)).inc()
        self.metrics.errors.labels(endpoint="http", code=str(status), reason=reason).inc()

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="prism-trt"'}
        if scheme.lower() != "bearer" or not credentials.strip():
            raise RequestError(401, "unauthorized", "this server needs an 'Authorization: Bearer <token>' header",
                               challenge)
        if not hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
            raise RequestError(401, "unauthorized", "the bearer token is wrong", challenge)

    def _check_model(self, request: Request) -> None:
        name, version = request.path_params["name"], request.path_params.get("version", MODEL_VERSION)
        if name != self.model_name:
            raise RequestError(404, "unknown_model", f"model '{name}' is not served here; this server serves "
                                                     f"'{self.model_name}'")
        if version != MODEL_VERSION:
            raise RequestError(404, "unknown_version", f"model '{name}' has no version '{version}'; it has one "
                                                       f"version, '{MODEL_VERSION}' (or leave /versions/... out)")

    async def _read_body(self, request: Request, limit: int) -> bytes:
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # compressed bodies are refused rather than inflated: a few KB of gzip can expand to GBs,
            # and float tensors hardly compress
            raise RequestError(415, "content_encoding", f"Content-Encoding {encoding!r} is not supported; send the "
                                                        f"body uncompressed (tritonclient: leave "
                                                        f"request_compression_algorithm unset)")
        declared = request.headers.get("content-length")
        if declared is not None:
            if byte_count(declared, "Content-Length") > limit:
                raise RequestError(413, "body_too_large", f"request body is {int(declared)} bytes; this server "
                                                          f"accepts at most {limit}")
        chunks, received = [], 0
        async for chunk in request.stream():  # also bounds chunked bodies, which declare no length
            received += len(chunk)
            if received > limit:
                raise RequestError(413, "body_too_large", f"request body exceeds {limit} bytes, the most this "
                                                          f"server accepts")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _health(self) -> Health:
        try:
            health = await run_in_threadpool(self.executor.health)  # a distributed executor may ask its ranks
        except Exception as exc:
            log.exception("executor health check failed")
            return Health(live=True, ready=False, reason=f"health check raised {exc!r}")
        if not self.batcher.healthy:
            return Health(live=health.live, ready=False, degraded=health.degraded, reason="the batch worker stopped")
        return health

    async def _infer(self, parsed: KServeRequest) -> Response:
        """Run one request and answer it."""
        started = time.perf_counter()
        try:
            outcome = await self.batcher.submit(parsed.request)
        except QueueFull as exc:
            raise RequestError(503, "overloaded", f"server busy: {exc}; retry later", {"Retry-After": "1"}) from None
        except BatcherStopped as exc:
            raise RequestError(503, "shutting_down", str(exc)) from None
        except InferenceFailed as exc:
            raise RequestError(500, "executor_error", f"inference failed: {exc}") from None
        header, raw = infer_response(self.model_name, parsed.request_id, parsed.outputs, outcome.logits,
                                     outcome.choice, outcome.fell_back, outcome.batch_size, outcome.queue_s * 1e3,
                                     outcome.executor_s * 1e3, parsed.binary_outputs)
        content, headers, media_type = encode_body(header, raw)
        self.metrics.latency.labels(mode=outcome.choice.label).observe(time.perf_counter() - started)
        self.metrics.queue_seconds.observe(outcome.queue_s)
        return Response(content, headers=headers, media_type=media_type)

    # ---------------------------------------------------------------- routes

    async def live(self, request: Request) -> Response:
        health = await self._health()
        return JSONResponse({"live": health.live}, status_code=200 if health.live else 503)

    async def ready(self, request: Request) -> Response:
        return await self._readiness({})

    async def _readiness(self, extra: dict) -> Response:
        health = await self._health()
        body = {**extra, "ready": health.ready, "degraded": health.degraded}
        if health.reason:
            body["reason"] = health.reason
        state = "not-ready" if not health.ready else "degraded" if health.degraded else "ready"
        # Degraded (e.g. a worker rank lost, serving locally) still serves, so it stays 200: a
        # load balancer must not pull the only replica; the header and body make it visible.
        return JSONResponse(body, status_code=200 if health.ready else 503, headers={"X-Prism-Health": state})

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(server_metadata(__version__))

    async def model_metadata(self, request: Request) -> Response:
        self._check_model(request)
        return JSONResponse(self.served.metadata(self.executor.chains()))

    async def model_config(self, request: Request) -> Response:
        self._check_model(request)
        metadata = self.served.metadata(self.executor.chains())
        return JSONResponse(model_config(metadata, self.executor.max_batch, self.batcher.max_wait_s,
                                         self.batcher.max_queue_images))

    async def model_stats(self, request: Request) -> Response:
        if "name" in request.path_params:  # else GET /v2/models/stats: every model's, this one
            self._check_model(request)
        return JSONResponse({"model_stats": [model_statistics(self.model_name, self.metrics)]})

    async def repository_index(self, request: Request) -> Response:
        body = await self._read_body(request, BODY_ALLOWANCE)
        options = load_json(body) if body.strip() else {}
        if not isinstance(options, dict) or not isinstance(options.get("ready", False), bool):
            raise RequestError(400, "malformed_request", f"the repository index takes an empty body or a JSON object "
                                                         f"like {{\"ready\": true}}, got {body[:80]!r}")
        health = await self._health()
        return JSONResponse(repository_index(self.model_name, health.ready, health.reason, options.get("ready", False)))

    async def model_ready(self, request: Request) -> Response:
        self._check_model(request)
        return await self._readiness({"name": self.model_name})

    async def infer(self, request: Request) -> Response:
        self._check_model(request)
        header_length = request.headers.get(HEADER_LENGTH)  # Triton's binary tensor extension
        body = await self._read_body(request, self.body_limits["json" if header_length is None else "binary"])
        # parsing a full batch takes milliseconds: off the loop, so the batch worker keeps going
        async with self.parse_slots:
            parsed = await run_in_threadpool(self.served.parse, body, header_length)
        return await self._infer(parsed)

    async def infer_image(self, request: Request) -> Response:
        self._check_model(request)
        self.served.require_image_input()
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await self._read_body(request, self.image_limit)
        if content_type == "multipart/form-data":
            data = await self._uploaded_file(request, body)
        elif content_type.startswith("image/") or content_type == "application/octet-stream":
            data = body
        else:
            raise RequestError(415, "content_type", f"expected a multipart/form-data upload with a 'file' field or a "
                                                    f"raw image body (Content-Type image/*), got "
                                                    f"{content_type or 'no Content-Type'}")
        async with self.decode_slots:
            images = await run_in_threadpool(self.served.decode_image, data)
        request_id = request.headers.get("x-request-id") or request.query_params.get("id") or ""
        return await self._infer(KServeRequest(self.served.request(images), request_id or uuid.uuid4().hex,
                                               OUTPUT_NAMES))

    async def _uploaded_file(self, request: Request, body: bytes) -> bytes:
        async def replay() -> dict:  # the body was already read under the size limit; parse it from memory
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=16)
        except HTTPException as exc:
            raise RequestError(400, "bad_multipart", f"could not parse the multipart body: {exc.detail}") from None
        try:
            upload = form.get("file")
            if upload is None:
                raise RequestError(400, "bad_multipart", f"the multipart body has no 'file' field; fields found: "
                                                         f"{sorted(form.keys())}")
            if not isinstance(upload, UploadFile):
                raise RequestError(400, "bad_multipart", "the 'file' field must be a file upload, not a text field")
            return await upload.read()
        finally:
            await form.close()

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def not_found(self, request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = (f"no route {request.method} {request.url.path}; see GET /v2 and /v2/models/{self.model_name}"
                   if status == 404 else f"{request.method} is not allowed on {request.url.path}")
        reason = "no_route" if status == 404 else "method_not_allowed"
        self.metrics.requests.labels(endpoint="unknown", code=str(status)).inc()
        return self.error_response("unknown", RequestError(status, reason, message))


def create_app(executor: Executor, selector: Selector, token: str | None = None,
               max_wait_ms: float = DEFAULT_MAX_WAIT_MS, max_body_bytes: int | None = None,
               max_queue_images: int | None = None, max_image_bytes: int | None = None,
               model_name: str | None = None) -> Starlette:
    """The KServe v2 app for one executor.

    token: when set, every endpoint but ``/v2/health/live`` wants ``Authorization: Bearer <token>``.
    max_wait_ms: how long a batch waits for more requests after its oldest one arrived.
    max_body_bytes: /infer body limit, JSON or binary (default :func:`default_max_body_bytes`), 413 above it.
    max_queue_images: images allowed to wait (default 16 full batches), 503 above it.
    max_image_bytes: /infer/image body limit (default :func:`default_max_image_bytes`), 413 above it.
    model_name: the name the model is served under (default the model's own, ``executor.model_name``).
    ``app.state.server`` holds the batcher and metrics.
    """
    server = _Server(executor, selector, token, max_wait_ms, max_body_bytes, max_queue_images, max_image_bytes,
                     model_name)
    e = server.endpoint
    # each model route also answers under /versions/{version}/, for the one version there is
    model_routes = [("", "model_metadata", server.model_metadata, "GET"),
                    ("/ready", "model_ready", server.model_ready, "GET"),
                    ("/config", "model_config", server.model_config, "GET"),
                    ("/stats", "model_stats", server.model_stats, "GET"),
                    ("/infer", "infer", server.infer, "POST")]
    routes = [
        # liveness probes (kubelet, systemd) carry no credentials, and liveness tells nothing about the model
        Route("/v2/health/live", e("live", server.live, public=True), methods=["GET"]),
        Route("/v2/health/ready", e("ready", server.ready), methods=["GET"]),
        Route("/v2", e("server_metadata", server.server_metadata), methods=["GET"]),
        Route("/v2/models/stats", e("model_stats", server.model_stats), methods=["GET"]),
        *(Route(f"/v2/models/{{name}}{versions}{tail}", e(name, handler), methods=[method])
          for versions in ("", "/versions/{version}") for tail, name, handler, method in model_routes),
        Route("/v2/models/{name}/infer/image", e("infer_image", server.infer_image), methods=["POST"]),
        Route("/v2/repository/index", e("repository_index", server.repository_index), methods=["POST"]),
        Route("/metrics", e("metrics", server.metrics_text), methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        server.batcher.start()
        log.info("serving model '%s' (max batch %d, batching wait %g ms, auth %s; body limits: JSON %d, binary %d, "
                 "image %d bytes, %d pixels)", server.model_name, executor.max_batch, max_wait_ms,
                 "on" if token else "off", server.body_limits["json"], server.body_limits["binary"],
                 server.image_limit, server.max_pixels)
        try:
            yield
        finally:
            await server.batcher.stop()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: server.not_found, 405: server.not_found})
    app.state.server = server
    return app

