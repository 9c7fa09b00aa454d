"""`cnnmnist serve`: TensorFlow Serving's REST API, an image endpoint and a draw-a-digit page.

A WSGI application served by Waitress (a pure-Python production server with no dependencies
of its own). The model is loaded once; concurrent requests are queued to one thread that runs
them as a single batch, so a busy server makes few, larger model calls.
"""

from __future__ import annotations

import concurrent.futures
import email.parser
import email.policy
import errno
import json
import queue
import re
import threading
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cnnmnist import checkpoint, predict, serving
from cnnmnist.checkpoint import SIGNATURE
from cnnmnist.errors import CnnmnistError

MAX_BODY = 16 * 2**20  # bytes; a larger request is answered 413 before it is read
MAX_BATCH = 256  # images per model call when queued requests are joined into one
VERSION = "1"  # a checkpoint is one model version, as TF Serving's layout numbers it
INPUT, OUTPUT = "pixels", "probabilities"
THREADS = 8  # Waitress's request threads; the model itself runs on one thread, batched
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
    """Runs the model for many threads: each call waits while one worker thread joins every
    queued request (up to MAX_BATCH images) into one model call."""

    def __init__(self, probabilities: Callable[[np.ndarray], np.ndarray]) -> None:
        self._probabilities = probabilities
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._work, name="cnnmnist-model", daemon=True).start()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities [N, 10] of pixels [N, 28, 28, 1]."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((pixels, future))
        return future.result()

    def _work(self) -> None:
        while True:
            jobs = [self._queue.get()]
            size = len(jobs[0][0])
            while size < MAX_BATCH:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
                size += len(jobs[-1][0])
            try:
                rows = self._probabilities(np.concatenate([pixels for pixels, _ in jobs]))
            except Exception as e:  # noqa: BLE001 - every waiting request gets the failure
                for _, future in jobs:
                    future.set_exception(e)
                continue
            start = 0
            for pixels, future in jobs:
                future.set_result(rows[start : start + len(pixels)])
                start += len(pixels)


class Model:
    """The checkpoint behind the server: its engine (TFLite when verified) and metadata."""

    def __init__(self, path: Path, name: str, warn: Callable[[str], None]) -> None:
        ckpt = checkpoint.read(path)
        self.path, self.name = Path(path), name
        self.engine = serving.engine(ckpt, warn)
        self.run = Batcher(self.engine.probabilities)


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


def _no_constants(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (NaN and Infinity refused, as JSON does)."""
    try:
        value = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise HTTPError(400, "malformed JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
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


def predict_json(request: dict[str, Any], run: Callable[[np.ndarray], np.ndarray]):
    """POST :predict in TF Serving's row ("instances") or columnar ("inputs") format."""
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
        return {"predictions": run(_pixels(rows, "instances")).tolist()}
    pixels = _pixels(_named(request["inputs"], "inputs"), "inputs")
    return {"outputs": run(pixels).tolist()}


# --- images ------------------------------------------------------------------------------


def uploaded_image(environ: dict[str, Any], body: bytes) -> tuple[str, bytes]:
    """The image of a POST /predict: a raw image/* body, or the `image` field of a multipart
    form. Returns a name for it and its bytes."""
    content_type = environ.get("CONTENT_TYPE", "")
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


def predict_image(model: Model, name: str, blob: bytes, pixels: bool) -> dict[str, Any]:
    """What `predict --json` gives for one file, through the same preprocessing."""
    prepared = predict.prepare(name, blob)
    if prepared.error:
        raise HTTPError(400, prepared.error)
    row = model.run(prepared.pixels.reshape(1, 28, 28, 1))[0] if predict.has_ink(prepared) else None
    answer = predict.result(prepared, row, model.engine.name)
    seen = answer.pop("pixels")
    if pixels:  # the page shows the 28x28 picture the model saw
        answer["pixels"] = seen.tolist()
    return answer


# --- the WSGI application ----------------------------------------------------------------


def application(model: Model):
    """The WSGI app serving `model` under its name."""
    pages = {
        route: (resources.files("cnnmnist").joinpath("static", file).read_bytes(), kind)
        for route, (file, kind) in PAGES.items()
    }

    def app(environ: dict[str, Any], start_response) -> Iterable[bytes]:
        try:
            status, headers, body = _route(model, pages, environ)
        except HTTPError as e:
            status, headers, body = e.status, [], _json({"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a bug: answer, log, and keep serving
            import traceback

            traceback.print_exc()
            status, headers, body = 500, [], _json({"error": f"internal error: {e}"})
        if not any(name == "Content-Type" for name, _ in headers):
            headers.append(("Content-Type", "application/json"))
        headers += [("Content-Length", str(len(body))), ("X-Content-Type-Options", "nosniff")]
        start_response(f"{status} {_REASONS.get(status, '')}".strip(), headers)
        return [body]

    return app


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}
_REASONS |= {411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type"}
_REASONS |= {500: "Internal Server Error"}


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _body(environ: dict[str, Any]) -> bytes:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HTTPError(400, "Content-Length is not a number") from None
    if length > MAX_BODY:
        raise HTTPError(413, f"the body is {length:,} bytes; the limit is {MAX_BODY:,}")
    return environ["wsgi.input"].read(length) if length > 0 else b""


def _route(model: Model, pages, environ: dict[str, Any]):
    method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
    if path in pages:
        _allow(method, "GET")
        content, kind = pages[path]
        return 200, [("Content-Type", kind), ("Cache-Control", "no-cache")], content
    if path == "/predict":
        _allow(method, "POST")
        wants_pixels = "pixels=1" in environ.get("QUERY_STRING", "").split("&")
        name, blob = uploaded_image(environ, _body(environ))
        return 200, [], _json(predict_image(model, name, blob, wants_pixels))
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
        return 200, [], _json(predict_json(parse_json(_body(environ)), model.run))
    raise HTTPError(404, f"no such method {rest!r}; expected :predict or /metadata")


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise HTTPError(405, f"{method} is not allowed here; use {allowed}")


def make_server(model: Model, host: str, port: int, threads: int = THREADS):
    """A Waitress server bound to host:port (port 0: any free port), not yet serving."""
    try:
        import waitress
    except ImportError:
        raise CnnmnistError("serve needs Waitress: pip install 'cnnmnist[serve]'") from None
    try:
        return waitress.create_server(
            application(model),
            host=host,
            port=port,
            threads=threads,
            max_request_body_size=MAX_BODY + 2**20,  # chunked bodies; ours answer 413 first
            ident="cnnmnist",
        )
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise CnnmnistError(
                f"{host}:{port} is already in use (another server?); choose another --port"
            ) from None
        raise CnnmnistError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
