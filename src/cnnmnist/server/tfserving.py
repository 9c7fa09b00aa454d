"""TensorFlow Serving's REST JSON: the model's status and metadata as TF Serving shows them, and
the pixels of a :predict request (row "instances" or columnar "inputs"), validated, in bounded
time and memory."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from cnnmnist.checkpoint import SIGNATURE

INPUT, OUTPUT = "pixels", "probabilities"
MAX_IMAGES = 1024  # images in one :predict request; more go in several requests
# What a request of MAX_IMAGES images holds at most: one JSON list per image, row and pixel
# (1 + 28 + 28 * 28), and a comma between neighbours. Counting them in the raw bytes (fast, in
# C) refuses a body that would parse into millions of lists before it is parsed.
MAX_LISTS = (1 + 28 + 28 * 28) * MAX_IMAGES + 8
MAX_COMMAS = 28 * 28 * MAX_IMAGES + 8
SCALED = (
    "every pixel value lies in 0..1: the model expects raw values 0..255 (white ink on black), "
    "as in MNIST's files; multiply by 255 (images scaled to 0..1 as the Keras example feeds "
    "them read as near-blank)"
)


class HTTPError(Exception):
    """A request the server refuses: its status and the message for {"error": ...}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def status_json(versions: list[tuple[int, str, str]]) -> dict[str, Any]:
    """GET /v1/models/NAME: each version (number, state, error message), as TF Serving."""
    return {
        "model_version_status": [
            {
                "version": str(version),
                "state": state,
                "status": {
                    "error_code": "OK" if not message else "UNKNOWN",
                    "error_message": message,
                },
            }
            for version, state, message in versions
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


def metadata_json(name: str, version: int) -> dict[str, Any]:
    """GET /v1/models/NAME/metadata: the serving_default signature, as TF Serving shows it."""
    signature = {
        "inputs": {INPUT: _tensor_info(f"{SIGNATURE}_{INPUT}:0", [-1, 28, 28, 1])},
        "outputs": {OUTPUT: _tensor_info("StatefulPartitionedCall:0", [-1, 10])},
        "method_name": "tensorflow/serving/predict",
    }
    return {
        "model_spec": {"name": name, "signature_name": "", "version": str(version)},
        "metadata": {"signature_def": {"signature_def": {SIGNATURE: signature}}},
    }


# A body that is one plain array of numbers under "instances" or "inputs": read by numpy from
# the text, without a Python object per number (four times faster on a large batch).
_PLAIN = re.compile(rb'\s*\{\s*"(instances|inputs)"\s*:\s*(\[[\[\]0-9eE+\-.,\s]*\])\s*\}\s*')
_PIXEL = "[" + ",".join(["[]"] * 28) + "]"
_IMAGE = "[" + ",".join([_PIXEL] * 28) + "]"  # one image's brackets and commas, numbers out


def plain_pixels(body: bytes) -> tuple[str, np.ndarray] | None:
    """The key for the answer and the pixels of a body that is a plain array of N images of
    [28, 28, 1] numbers; None for any other body (it then takes the general way)."""
    match = _PLAIN.fullmatch(body)
    if match is None:
        return None
    payload = match.group(2)
    skeleton = payload.translate(None, b"0123456789eE+-. \t\r\n")
    n = skeleton.count(b"[") // (1 + 28 + 28 * 28)
    if not 0 < n <= MAX_IMAGES or skeleton != ("[" + ",".join([_IMAGE] * n) + "]").encode():
        return None
    numbers = np.fromstring(payload.translate(None, b"[] \t\r\n"), dtype=np.float64, sep=",")
    if numbers.size != n * 28 * 28:  # a number numpy could not read: let JSON say what
        return None
    key = "predictions" if match.group(1) == b"instances" else "outputs"
    return key, pixels_of(numbers.reshape(n, 28, 28, 1), match.group(1).decode())


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (strict JSON: no NaN, nesting at most 1,024 deep),
    refused before parsing when it holds more lists or numbers than MAX_IMAGES images can."""
    import orjson  # several times faster than json on bodies of pixel values

    if body.count(b"[") > MAX_LISTS or body.count(b",") > MAX_COMMAS:
        raise HTTPError(
            413,
            f"more than {MAX_IMAGES} images' worth of values; send at most {MAX_IMAGES} "
            "images a request",
        )
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise HTTPError(400, f"malformed JSON: {e}") from None
    if not isinstance(value, dict):
        raise HTTPError(400, 'the body must be a JSON object with "instances" or "inputs"')
    return value


def pixels_of(value: Any, what: str) -> np.ndarray:
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
    if len(array) > MAX_IMAGES:
        raise HTTPError(413, f"{len(array)} images; send at most {MAX_IMAGES} a request")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 255:
        raise HTTPError(400, f"{what}: pixel values must lie in 0..255 (white ink on black)")
    return array.astype(np.float32)


def _named(value: Any, what: str) -> Any:
    """An input given by name ({"pixels": ...}) or bare, as TF Serving allows for one input."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - {INPUT})
        if unknown or INPUT not in value:
            raise HTTPError(
                400, f"{what}: the signature has one input, {INPUT!r}; got {sorted(value)[:5]}"
            )
        return value[INPUT]
    return value


def predict_inputs(request: dict[str, Any]) -> tuple[str, np.ndarray]:
    """The pixels of a POST :predict in TF Serving's row ("instances") or columnar ("inputs")
    format, and the key its answer goes under ("predictions" or "outputs")."""
    signature = request.get("signature_name", SIGNATURE)
    if signature != SIGNATURE:
        shown = repr(signature)[:60]
        raise HTTPError(400, f"signature {shown} not found; this model has only {SIGNATURE!r}")
    unknown = sorted(set(request) - {"instances", "inputs", "signature_name"})
    if unknown:
        raise HTTPError(400, f'unknown field(s) {unknown[:5]}; expected "instances" or "inputs"')
    if ("instances" in request) == ("inputs" in request):
        raise HTTPError(400, 'give exactly one of "instances" (row format) or "inputs" (columnar)')
    if "instances" in request:
        instances = request["instances"]
        if not isinstance(instances, list) or not instances:
            raise HTTPError(400, '"instances" must be a non-empty list, one [28, 28, 1] per image')
        rows = [_named(instance, "instances") for instance in instances]
        return "predictions", pixels_of(rows, "instances")
    return "outputs", pixels_of(_named(request["inputs"], "inputs"), "inputs")


def looks_scaled(pixels: np.ndarray) -> bool:
    """Whether a batch's pixels all lie in 0..1 with some ink: scaled as the Keras example
    scales them, not the raw 0..255 the signature takes."""
    top = float(pixels.max())
    return 0.0 < top <= 1.0
