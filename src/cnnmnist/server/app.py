"""The HTTP application (Starlette): TensorFlow Serving's REST API over the model's versions,
POST /predict and /explain for image files, the draw-a-digit page, the metrics, a cloud
platform's routes; each request's body bounded in size and time, every request counted
(`observe`) and refused when a web page on another site sends it (`guard`)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cnnmnist import predict
from cnnmnist.preprocess import has_ink, prepare
from cnnmnist.server import observe, tfserving
from cnnmnist.server.guard import Guard
from cnnmnist.server.servables import POLL_SECONDS, Servable, Servables
from cnnmnist.server.tfserving import HTTPError

MAX_BODY = 16 * 2**20  # bytes; a larger request is answered 413 before it is read
BODY_TIMEOUT = 30.0  # seconds to send a whole body: a stalled one does not hold a connection
# Bodies up to this size are parsed on the event loop (faster than a thread hop); larger ones,
# which take milliseconds, one at a time on a worker thread, so that several at once cannot
# hold many parsed copies in memory together.
INLINE_BODY = 64 * 2**10
MAX_FORM_FIELDS = 8  # an upload form has one file and perhaps a few fields, never thousands
PAGES = {  # the only files served: the page, read from the package, never paths from requests
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
    "/favicon.ico": ("favicon.svg", "image/svg+xml"),  # browsers ask for it by this name
}


def log(line: str) -> None:
    """A line of the server's log, on stderr; escaped, since clients choose some of its text
    (a request's path in the access log)."""
    from cnnmnist.render import safe

    print(safe(line), file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    """What the application is told by `serve`'s options."""

    hosts: frozenset[str] | None = None  # Host headers answered; None: any
    origins: frozenset[str] = frozenset()  # other sites' pages allowed to call (CORS)
    metrics_path: str = observe.METRICS_PATH
    access_log: bool = False
    # A cloud platform's routes (Vertex AI's AIP_HEALTH_ROUTE, AIP_PREDICT_ROUTE), if any.
    health_route: str | None = None
    predict_route: str | None = None
    poll_seconds: float = POLL_SECONDS
    log: Callable[[str], None] = log


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status, headers, media_type="application/json")


def error(status: int, message: str, close: bool = False) -> Response:
    """An error as TF Serving gives it: {"error": message}."""
    return _json({"error": message}, status, {"connection": "close"} if close else None)


async def read_body(request: Request) -> bytes:
    """The body, refused (413) as soon as it is known to exceed MAX_BODY and (408) when it is
    not all sent within BODY_TIMEOUT."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPError(400, "Content-Length is not a number")
        if int(declared) > MAX_BODY:
            raise HTTPError(413, f"the body is {int(declared):,} bytes; the limit is {MAX_BODY:,}")
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY:
                    raise HTTPError(413, f"the body is over the limit of {MAX_BODY:,} bytes")
    except TimeoutError:
        raise HTTPError(408, f"the body was not sent within {BODY_TIMEOUT:g} s") from None
    request._body = bytes(body)  # Starlette's form parser reads it from here
    return request._body


async def _off_loop(fn, *args):
    """fn(*args) on a worker thread: work that would hold up every other request."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


class Endpoints:
    """What each route does, for the model's versions."""

    def __init__(self, servables: Servables, settings: Settings, metrics: observe.Metrics):
        self.servables, self.settings, self.metrics = servables, settings, metrics
        self.files = {
            route: (resources.files("cnnmnist.server").joinpath("static", file).read_bytes(), kind)
            for route, (file, kind) in PAGES.items()
        }
        self.big_bodies = asyncio.Semaphore(1)

    async def page(self, request: Request) -> Response:
        content, kind = self.files[request.url.path]
        return Response(content, media_type=kind, headers={"cache-control": "no-cache"})

    async def metrics_page(self, request: Request) -> Response:
        content, kind = self.metrics.page()
        return Response(content, headers={"content-type": kind})

    async def health(self, request: Request) -> Response:
        """The cloud platform's health route: 200 once a version answers."""
        return _json({"status": "ok", "version": self.servables.current.version})

    async def predict_image(self, request: Request) -> Response:
        """POST /predict: what `predict --json` gives for one uploaded file."""
        prepared = await _prepared_upload(request)
        model = self.servables.current
        row = None
        if has_ink(prepared):
            row = (await model.run(prepared.pixels.reshape(1, 28, 28, 1)))[0]
        answer = predict.result(prepared, row, model.runner.name)
        seen = answer.pop("pixels")
        if "pixels=1" in request.url.query.split("&"):  # the page shows what the model saw
            answer["pixels"] = seen.tolist()
        return _json(answer, headers=_served_by(model))

    async def explain_image(self, request: Request) -> Response:
        """POST /explain: the uploaded digit explained (`cnnmnist explain`), the first two
        blocks' feature maps as pictures."""
        prepared = await _prepared_upload(request)
        model = self.servables.current
        if not has_ink(prepared):
            answer = predict.result(prepared, None, model.runner.name)
            return _json({k: v for k, v in answer.items() if k != "pixels"})
        answer = await model.run.call(model.explain, prepared)
        return _json(answer | {"warnings": prepared.warnings}, headers=_served_by(model))

    async def models(self, request: Request) -> Response:
        """/v1/models/NAME[/versions/N][/metadata | :predict], as TF Serving answers them."""
        name, version, method = _model_path(request.path_params["rest"])
        if name != self.servables.name:
            raise HTTPError(
                404,
                f"Servable not found for request: {name[:60]!r}; this server serves "
                f"{self.servables.name!r}",
            )
        model = self._version(version)
        if method == "":
            _allow(request, "GET")
            return _json(tfserving.status_json(self.servables.statuses()))
        if method == "/metadata":
            _allow(request, "GET")
            return _json(tfserving.metadata_json(model.name, model.version))
        if method == ":predict":
            _allow(request, "POST")
            return await self.predict_json(request, model)
        raise HTTPError(404, f"no such method {method[:40]!r}; expected :predict or /metadata")

    def _version(self, version: str | None) -> Servable:
        """The servable for a version in a path (None: the current one); 404 if none."""
        try:
            return self.servables.get(None if version is None else int(version))
        except (KeyError, ValueError):
            current = self.servables.current.version
            raise HTTPError(
                404,
                f"version {version[:20]!r} of {self.servables.name!r} is not available; "
                f"version {current} is",
            ) from None

    async def predict_json(self, request: Request, model: Servable | None = None) -> Response:
        """POST :predict (and a platform's predict route): probabilities for TF Serving's row
        or columnar JSON."""
        model = model or self.servables.current
        body = await read_body(request)
        if len(body) <= INLINE_BODY:
            key, pixels = _parsed(body)
        else:
            async with self.big_bodies:
                key, pixels = await _off_loop(_parsed, body)
        answer: dict[str, Any] = {key: await model.run(pixels)}
        if tfserving.looks_scaled(pixels):
            answer["warnings"] = [tfserving.SCALED]
            self.settings.log(
                f"warning: a :predict request's pixels all lie in 0..1 ({len(pixels)} images)"
            )
        return _json(answer, headers=_served_by(model))


def _served_by(model: Servable) -> dict[str, str]:
    """Headers naming the model and version that answered (for logs, metrics and clients)."""
    return {"x-model-name": model.name, "x-model-version": str(model.version)}


# Something that runs beside the HTTP server while it serves (the gRPC API): started with the
# event loop and the metrics, it returns how to stop it.
Service = Callable[[asyncio.AbstractEventLoop, observe.Metrics], Callable[[], None]]


def application(servables: Servables, settings: Settings = Settings(), services=()):
    """The ASGI application serving the model's versions, behind its guard, observed; with
    `services` (Service) started and stopped with it."""
    metrics = observe.Metrics()
    servables.observe = metrics.batch.observe
    endpoints = Endpoints(servables, settings, metrics)
    routes = [Route(path, endpoints.page, methods=["GET"]) for path in PAGES]
    routes += [
        Route(settings.metrics_path, endpoints.metrics_page, methods=["GET"]),
        Route("/predict", _refusing(endpoints.predict_image), methods=["POST"]),
        Route("/explain", _refusing(endpoints.explain_image), methods=["POST"]),
        Route("/v1/models/{rest:path}", _refusing(endpoints.models), methods=["GET", "POST"]),
    ]
    if settings.health_route:
        routes.append(Route(settings.health_route, endpoints.health, methods=["GET"]))
    if settings.predict_route:
        routes.append(
            Route(settings.predict_route, _refusing(endpoints.predict_json), methods=["POST"])
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        polling = asyncio.create_task(servables.poll(settings.poll_seconds))
        loop = asyncio.get_running_loop()
        stops = [start(loop, metrics) for start in services]
        try:
            yield
        finally:
            polling.cancel()
            for stop in stops:
                stop()

    app = Starlette(
        routes=routes,
        exception_handlers={404: _not_found, 405: _not_allowed},
        lifespan=lifespan,
    )
    observed = observe.Observe(app, metrics, settings.access_log, settings.log)
    return Guard(observed, settings.hosts, settings.origins)


def _parsed(body: bytes):
    """The answer's key and the pixels of a :predict body."""
    return tfserving.plain_pixels(body) or tfserving.predict_inputs(tfserving.parse_json(body))


def _refusing(endpoint):
    """The endpoint, its refusals (HTTPError) answered as JSON errors, and any other failure
    as a 500 whose details go to the server's log, not to the client."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except HTTPError as e:
            return error(e.status, str(e), close=e.status in (408, 413))
        except Exception:  # noqa: BLE001 - a bug: answer, log, and keep serving
            traceback.print_exc()
            return error(500, "internal error; the server's log has the details")

    return answer


async def _prepared_upload(request: Request):
    """The uploaded image, prepared as `predict` prepares a file (a 400 if it cannot be)."""
    name, blob = await uploaded_image(request)
    prepared = await _off_loop(prepare, name, blob)  # decoding takes milliseconds
    if prepared.error:
        raise HTTPError(400, prepared.error.removeprefix(f"{name}: "))
    return prepared


async def uploaded_image(request: Request) -> tuple[str, bytes]:
    """The image of a POST /predict: a raw image/* body, or the `image` field of a multipart
    form. Returns a name for it and its bytes."""
    kind = request.headers.get("content-type", "")
    body = await read_body(request)
    if kind.startswith("image/"):
        return "<upload>", body
    if not kind.startswith("multipart/form-data"):
        raise HTTPError(
            415,
            "send an image with an image/* Content-Type, or a multipart form with field 'image'",
        )
    try:
        async with request.form(
            max_files=1, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_BODY
        ) as form:
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HTTPError(400, "the multipart form has no file in a field named 'image'")
            return upload.filename or "<upload>", await upload.read()
    except HTTPError:
        raise
    except Exception as e:  # noqa: BLE001 - python-multipart's refusals: too many parts, ...
        detail = getattr(e, "detail", None) or str(e) or type(e).__name__
        raise HTTPError(400, f"malformed multipart form: {str(detail)[:200]}") from None


def _model_path(rest: str) -> tuple[str, str | None, str]:
    """NAME, VERSION (or None) and the method ('', '/metadata' or ':predict') of a path under
    /v1/models/: NAME[/versions/VERSION][/metadata | :predict]."""
    head, colon, verb = rest.partition(":")
    parts = head.split("/")
    name, version = parts[0], None
    if len(parts) >= 3 and parts[1] == "versions":
        version, parts = parts[2], parts[2:]
    method = "/" + "/".join(parts[1:]) if len(parts) > 1 else ""
    return name, version, method + (f":{verb}" if colon else "")


def _allow(request: Request, method: str) -> None:
    allowed = {method, "HEAD"} if method == "GET" else {method}
    if request.method not in allowed:
        raise HTTPError(405, f"{request.method} is not allowed here; use {method}")


async def _not_found(request: Request, exc) -> Response:
    return error(404, f"no such path {request.url.path[:100]!r}; see /v1/models/ and /")


async def _not_allowed(request: Request, exc) -> Response:
    return error(405, f"{request.method} is not allowed on {request.url.path[:100]!r}")
