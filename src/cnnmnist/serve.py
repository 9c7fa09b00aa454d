"""`cnnmnist serve`: TensorFlow Serving's REST API, an image endpoint and a draw-a-digit page.

An ASGI application served by Uvicorn (the server under FastAPI and Starlette, with C HTTP
parsing and event loop). The model is loaded once. Requests are read and answered on the event
loop; the model runs on a thread of its own, on every request that arrived while it was busy
as one batch, so a busy server makes few, larger model calls. Image decoding and large JSON
bodies go to worker threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.parser
import email.policy
import errno
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cnnmnist import checkpoint, predict, serving
from cnnmnist.checkpoint import SIGNATURE
from cnnmnist.errors import CnnmnistError

MAX_BODY = 16 * 2**20  # bytes; a larger request is answered 413 before it is read
BACKLOG = 2048  # connections the kernel holds before the server accepts them (Uvicorn's)
MAX_BATCH = 256  # images per model call when queued requests are joined into one
VERSION = "1"  # a checkpoint is one model version, as TF Serving's layout numbers it
INPUT, OUTPUT = "pixels", "probabilities"
PAGES = {  # the only files served: the page, read from the package, never paths from requests
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}
_MODEL_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>[^/:]+))?")


class HTTPError(Exception):
    """A request the server refuses: its status and the message for {"error": ...}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Batcher:
    """Runs the model for every request on the event loop: requests that arrive while the
    model is busy are joined (up to MAX_BATCH images) into its next call, made on one thread
    of its own so the loop keeps reading requests meanwhile."""

    def __init__(self, probabilities: Callable[[np.ndarray], np.ndarray]) -> None:
        self._probabilities = probabilities
        self._pending: list[tuple[np.ndarray, asyncio.Future]] = []
        self._draining = False
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="cnnmnist-model")

    async def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities [N, 10] of pixels [N, 28, 28, 1]."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((pixels, future))
        if not self._draining:
            self._draining = True
            loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            jobs, size = [], 0
            while self._pending and (not jobs or size + len(self._pending[0][0]) <= MAX_BATCH):
                jobs.append(self._pending.pop(0))
                size += len(jobs[-1][0])
            batch = np.concatenate([pixels for pixels, _ in jobs])
            try:
                rows = await loop.run_in_executor(self._thread, self._probabilities, batch)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
                for _, future in jobs:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for pixels, future in jobs:
                if not future.done():  # its client may have gone
                    future.set_result(rows[start : start + len(pixels)])
                start += len(pixels)
        self._draining = False

    def close(self) -> None:
        """Let the model's thread end once its current call (if any) returns."""
        self._thread.shutdown(wait=False, cancel_futures=True)


class Model:
    """The checkpoint behind the server: its engine (TFLite when verified) and metadata."""

    def __init__(self, path: Path, name: str, warn: Callable[[str], None]) -> None:
        ckpt = checkpoint.read(path)
        self.path, self.name = Path(path), name
        self.engine = serving.engine(ckpt, warn)
        self.run = Batcher(self.engine.probabilities)  # awaitable: probabilities of pixels

    def close(self) -> None:
        """Release the model's thread."""
        self.run.close()


# --- TF Serving's REST API ---------------------------------------------------------------


def status_json() -> dict[str, Any]:
    """GET /v1/models/NAME: one version, available."""
    return {
        "model_version_status": [
            {
                "version": VERSION,
                "state": "AVAILABLE",
                "status": {"error_code": "OK", "error_message": ""},
            }
        ]
    }


def _tensor_info(tensor: str, dims: list[int]) -> dict[str, Any]:
    return {
        "dtype": "DT_FLOAT",
        "tensor_shape": {
            "dim": [{"size": str(d), "name": ""} for d in dims],
            "unknown_rank": False,
        },
        "name": tensor,
    }


def metadata_json(name: str) -> dict[str, Any]:
    """GET /v1/models/NAME/metadata: the serving_default signature, as TF Serving shows it."""
    signature = {
        "inputs": {INPUT: _tensor_info(f"{SIGNATURE}_{INPUT}:0", [-1, 28, 28, 1])},
        "outputs": {OUTPUT: _tensor_info("StatefulPartitionedCall:0", [-1, 10])},
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": name, "signature_name": "", "version": VERSION},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}},
    }


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (strict JSON: no NaN, nesting at most 1,024 deep)."""
    import orjson  # several times faster than json on bodies of pixel values

    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise HTTPError(400, f"malformed JSON: {e}") from None
    if not isinstance(value, dict):
        raise HTTPError(400, 'the body must be a JSON object with "instances" or "inputs"')
    return value


def _pixels(value: Any, what: str) -> np.ndarray:
    """A validated float32 batch [N, 28, 28, 1] of pixel values 0..255."""
    expected = "a list of [28, 28, 1] arrays" if what == "instances" else "an [N, 28, 28, 1] array"
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, RecursionError):  # ragged lists, ...
        array = None
    if array is None or array.dtype.kind not in "iuf":
        raise HTTPError(400, f"{what}: expected numbers (pixels 0..255, float32) in {expected}")
    if array.ndim != 4 or array.shape[1:] != (28, 28, 1) or not len(array):
        raise HTTPError(
            400, f"{what}: expected {expected} for input {INPUT!r}, got shape {list(array.shape)}"
        )
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise HTTPError(400, f"{what}: pixel values must lie in 0..255 (white ink on black)")
    return array.astype(np.float32)


def _named(value: Any, what: str) -> Any:
    """An input given by name ({"pixels": ...}) or bare, as TF Serving allows for one input."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {INPUT})
        if unknown or INPUT not in value:
            raise HTTPError(
                400, f"{what}: the signature has one input, {INPUT!r}; got {sorted(value)}"
            )
        return value[INPUT]
    return value


def predict_inputs(request: dict[str, Any]) -> tuple[str, np.ndarray]:
    """The pixels of a POST :predict in TF Serving's row ("instances") or columnar ("inputs")
    format, and the key its answer goes under ("predictions" or "outputs")."""
    signature = request.get("signature_name", SIGNATURE)
    if signature != SIGNATURE:
        raise HTTPError(
            400, f"signature {signature!r} not found; this model has only {SIGNATURE!r}"
        )
    unknown = sorted(set(request) - {"instances", "inputs", "signature_name"})
    if unknown:
        raise HTTPError(400, f'unknown field(s) {unknown}; expected "instances" or "inputs"')
    if ("instances" in request) == ("inputs" in request):
        raise HTTPError(400, 'give exactly one of "instances" (row format) or "inputs" (columnar)')
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list) or not instances:
            raise HTTPError(400, '"instances" must be a non-empty list, one [28, 28, 1] per image')
        rows = [_named(instance, "instances") for instance in instances]
        return "predictions", _pixels(rows, "instances")
    return "outputs", _pixels(_named(request["inputs"], "inputs"), "inputs")


# --- images ------------------------------------------------------------------------------


def uploaded_image(content_type: str, body: bytes) -> tuple[str, bytes]:
    """The image of a POST /predict: a raw image/* body, or the `image` field of a multipart
    form. Returns a name for it and its bytes."""
    if content_type.startswith("image/"):
        return "<upload>", body
    if content_type.startswith("multipart/form-data"):
        header = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
        for part in message.iter_parts() if message.is_multipart() else ():
            if part.get_param("name", header="content-disposition") == "image":
                return part.get_filename() or "<upload>", part.get_payload(decode=True) or b""
        raise HTTPError(400, "the multipart form has no field named 'image'")
    raise HTTPError(
        415, "send an image with an image/* Content-Type, or a multipart form with field 'image'"
    )


async def predict_image(model: Model, name: str, blob: bytes, pixels: bool) -> dict[str, Any]:
    """What `predict --json` gives for one file, through the same preprocessing."""
    prepared = await _off_loop(predict.prepare, name, blob)  # decoding takes milliseconds
    if prepared.error:
        raise HTTPError(400, prepared.error)
    row = None
    if predict.has_ink(prepared):
        row = (await model.run(prepared.pixels.reshape(1, 28, 28, 1)))[0]
    answer = predict.result(prepared, row, model.engine.name)
    seen = answer.pop("pixels")
    if pixels:  # the page shows the 28x28 picture the model saw
        answer["pixels"] = seen.tolist()
    return answer


# --- the application ----------------------------------------------------------------------


@dataclass
class Request:
    """What the routes need of an HTTP request, whichever server received it."""

    method: str
    path: str
    query: str = ""
    content_type: str = ""
    body: bytes = b""


def pages() -> dict[str, tuple[bytes, str]]:
    """The page's files, read from the package once."""
    return {
        route: (resources.files("cnnmnist").joinpath("static", file).read_bytes(), kind)
        for route, (file, kind) in PAGES.items()
    }


async def respond(model: Model, files, request: Request):
    """Status, headers and body of the answer to `request`: errors are JSON {"error": ...}."""
    try:
        status, headers, body = await _route(model, files, request)
    except HTTPError as e:
        status, headers, body = e.status, [], _json({"error": str(e)})
    except Exception as e:  # noqa: BLE001 - a bug: answer, log, and keep serving
        import traceback

        traceback.print_exc()
        status, headers, body = 500, [], _json({"error": f"internal error: {e}"})
    return _finish(status, headers, body)


def _finish(status: int, headers: list[tuple[str, str]], body: bytes):
    """The answer with the headers every response has (JSON unless it says otherwise)."""
    if not any(name == "content-type" for name, _ in headers):
        headers.append(("content-type", "application/json"))
    headers += [("content-length", str(len(body))), ("x-content-type-options", "nosniff")]
    return status, headers, body


def _json(value: Any) -> bytes:
    import orjson

    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)


async def _off_loop(fn, *args):
    """fn(*args) on a worker thread: work that would hold up every other request."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


# Bodies up to this size are parsed on the event loop (faster than a thread hop); larger ones,
# which take milliseconds, on a worker thread.
INLINE_BODY = 64 * 2**10


async def _route(model: Model, files, request: Request):
    method, path = request.method, request.path
    if path in files:
        _allow(method, "GET")
        content, kind = files[path]
        return 200, [("content-type", kind), ("cache-control", "no-cache")], content
    if path == "/predict":
        _allow(method, "POST")
        wants_pixels = "pixels=1" in request.query.split("&")
        name, blob = uploaded_image(request.content_type, request.body)
        return 200, [], _json(await predict_image(model, name, blob, wants_pixels))
    match = _MODEL_PATH.match(path)
    if not match:
        raise HTTPError(404, f"no such path {path!r}; see /v1/models/{model.name}")
    rest = path[match.end() :]
    if match["name"] != model.name:
        raise HTTPError(
            404,
            f"Servable not found for request: {match['name']!r}; this server serves {model.name!r}",
        )
    if match["version"] not in (None, VERSION):
        raise HTTPError(
            404,
            f"version {match['version']!r} of {model.name!r} not found; the "
            f"only version is {VERSION}",
        )
    if rest == "":
        _allow(method, "GET")
        return 200, [], _json(status_json())
    if rest == "/metadata":
        _allow(method, "GET")
        return 200, [], _json(metadata_json(model.name))
    if rest == ":predict":
        _allow(method, "POST")
        if len(request.body) <= INLINE_BODY:
            key, pixels = predict_inputs(parse_json(request.body))
        else:
            key, pixels = await _off_loop(lambda: predict_inputs(parse_json(request.body)))
        return 200, [], _json({key: await model.run(pixels)})
    raise HTTPError(404, f"no such method {rest!r}; expected :predict or /metadata")


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise HTTPError(405, f"{method} is not allowed here; use {allowed}")


def application(model: Model):
    """The ASGI app serving `model`."""
    files = pages()

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            body = await _read_body(receive, headers.get("content-length"))
        except HTTPError as e:  # the body is not read: close the connection after answering
            answer = _finish(e.status, [("connection", "close")], _json({"error": str(e)}))
        else:
            request = Request(
                scope["method"],
                scope["path"],
                scope["query_string"].decode("latin-1"),
                headers.get("content-type", ""),
                body,
            )
            answer = await respond(model, files, request)
        status, response_headers, payload = answer
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1")) for k, v in response_headers
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    return app


async def _read_body(receive, declared: str | None) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed MAX_BODY."""
    too_large = f"the body is over the limit of {MAX_BODY:,} bytes"
    if declared is not None:
        try:
            if int(declared) > MAX_BODY:
                raise HTTPError(
                    413, f"the body is {int(declared):,} bytes; the limit is {MAX_BODY:,}"
                )
        except ValueError:
            raise HTTPError(400, "Content-Length is not a number") from None
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise HTTPError(413, too_large)
        if not message.get("more_body"):
            return bytes(body)


# SIGINT (Ctrl-C) and SIGTERM (docker stop, systemd) stop the server, exit 0.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE = 2.0  # seconds that requests still running get to finish once a stop is asked


class Server:
    """The HTTP server (Uvicorn) on a socket bound at once, so a busy port fails here."""

    def __init__(self, model: Model, host: str, port: int) -> None:
        import importlib.util
        import socket

        missing = [m for m in ("uvicorn", "orjson") if importlib.util.find_spec(m) is None]
        if missing:
            raise CnnmnistError(
                f"serve needs {' and '.join(missing)}: pip install 'cnnmnist[serve]'"
            )
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, port))
        except OSError as e:
            self.socket.close()
            if e.errno == errno.EADDRINUSE:
                raise CnnmnistError(
                    f"{host}:{port} is already in use (another server?); choose another --port"
                ) from None
            raise CnnmnistError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.socket.listen(BACKLOG)  # from now on connections wait for the loop, not fail
        self.port = self.socket.getsockname()[1]
        self.model = model
        fast = {"http": "httptools", "loop": "uvloop"}  # C parsers and loop when installed
        config = uvicorn.Config(
            application(model),
            log_level="error",
            access_log=False,
            server_header=False,
            backlog=BACKLOG,
            timeout_graceful_shutdown=GRACE,
            **{k: v for k, v in fast.items() if importlib.util.find_spec(v)},
        )
        self._server = _quiet_about_signals(uvicorn.Server)(config)

    def run(self, announce: Callable[[], None] = lambda: None) -> None:
        """Call `announce` (say where the server listens), then serve until SIGINT or SIGTERM
        (or close() from another thread), and release the socket and the model's thread.

        The stop signals are caught before `announce`, so a stop asked at any moment after
        it ends the same way: the signal only raises a flag, which Uvicorn reads before it
        starts serving and every tenth of a second after. Nothing is raised into whatever
        the main thread was doing (a KeyboardInterrupt in the event loop's start-up could
        leave it hung, or end the process with another status). A second signal skips the
        wait for requests still running.
        """
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._stop) for s in STOP_SIGNALS} if main else {}
        try:
            announce()
            self._server.run(sockets=[self.socket])
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.socket.close()
            self.model.close()

    def _stop(self, signum: int, frame) -> None:
        if self._server.should_exit:
            self._server.force_exit = True
        self._server.should_exit = True

    def close(self) -> None:
        self._server.should_exit = True


def _quiet_about_signals(server: type) -> type:
    """Uvicorn's server, minus its own signal handlers (Server.run has caught them already)."""

    class Server(server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    return Server
