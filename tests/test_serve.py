"""`cnnmnist serve`: TF Serving's REST API, the image endpoint, bad input, load, start and stop."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import without_package
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnmnist.cli import cli
from cnnmnist.server.app import MAX_BODY
from cnnmnist.server.listen import Options, Server, open_server

NAME = "cnnmnist"


class Client:
    """Requests to a running server; each call returns (status, parsed JSON or raw bytes)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def __call__(self, method, path, body=None, headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            if isinstance(body, dict | list):
                body = json.dumps(body).encode()
            connection.request(method, path, body, headers or {})
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        if response.getheader("Content-Type", "").startswith("application/json"):
            return response.status, json.loads(data)
        return response.status, data


def _in_process(ckpt) -> Server:
    """A server for `ckpt` on a free loopback port, answering any Host name (as `serve`
    makes it, bound and not yet running)."""
    running, _ = open_server(ckpt, "127.0.0.1", 0, Options(name=NAME, allow_hosts=("*",)), print)
    return running


@pytest.fixture(scope="module")
def server(trained):
    """`trained`'s checkpoint served in this process on a free port."""
    running = _in_process(trained.checkpoint)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    yield Client(running.port)
    running.close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def reference(trained):
    """The SavedModel's own serving signature."""
    from cnnmnist.runners import SavedModel

    return SavedModel(trained.checkpoint)


def _digits(mnist, n):
    return mnist.test_images[:n].astype(np.float32).reshape(n, 28, 28, 1)


def test_status_and_metadata_as_tf_serving_gives_them(server):
    for path in (f"/v1/models/{NAME}", f"/v1/models/{NAME}/versions/1"):
        status, body = server("GET", path)
        assert status == 200
        assert body["model_version_status"][0]["state"] == "AVAILABLE"
    status, body = server("GET", f"/v1/models/{NAME}/metadata")
    assert status == 200 and body["model_spec"]["name"] == NAME
    signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    pixels = signature["inputs"]["pixels"]
    assert pixels["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in pixels["tensor_shape"]["dim"]] == ["-1", "28", "28", "1"]
    out = signature["outputs"]["probabilities"]["tensor_shape"]["dim"]
    assert [d["size"] for d in out] == ["-1", "10"]


def test_row_and_columnar_predictions_equal_the_savedmodel_signature(server, reference, mnist):
    pixels = _digits(mnist, 5)
    want = reference.probabilities(pixels)
    requests = [
        ("predictions", {"instances": pixels.tolist()}),
        ("predictions", {"instances": [{"pixels": p} for p in pixels.tolist()]}),
        ("outputs", {"inputs": pixels.tolist()}),
        ("outputs", {"inputs": {"pixels": pixels.tolist()}, "signature_name": "serving_default"}),
    ]
    for path in (f"/v1/models/{NAME}:predict", f"/v1/models/{NAME}/versions/1:predict"):
        for key, request in requests:
            status, body = server("POST", path, request)
            assert status == 200, body
            assert list(body) == [key]
            np.testing.assert_allclose(np.array(body[key]), want, atol=1e-5)


DEEP = b"[" * 100_000 + b"]" * 100_000
ONE = np.zeros((28, 28, 1)).tolist()


@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        ("POST", f"/v1/models/{NAME}:predict", b"{not json", 400, "malformed JSON"),
        ("POST", f"/v1/models/{NAME}:predict", b"[1, 2]", 400, "JSON object"),
        ("POST", f"/v1/models/{NAME}:predict", b'{"instances": [NaN]}', 400, "malformed JSON"),
        ("POST", f"/v1/models/{NAME}:predict", DEEP, 400, "depth limit"),
        ("POST", f"/v1/models/{NAME}:predict", {"instances": []}, 400, "non-empty"),
        ("POST", f"/v1/models/{NAME}:predict", {}, 400, "exactly one of"),
        ("POST", f"/v1/models/{NAME}:predict", {"instances": [ONE], "inputs": [ONE]}, 400, "one"),
        ("POST", f"/v1/models/{NAME}:predict", {"instances": [[1, 2]]}, 400, "[28, 28, 1]"),
        ("POST", f"/v1/models/{NAME}:predict", {"inputs": ONE}, 400, "[N, 28, 28, 1]"),
        (
            "POST",
            f"/v1/models/{NAME}:predict",
            {"instances": [[[["a"]] * 28] * 28]},
            400,
            "numbers",
        ),
        ("POST", f"/v1/models/{NAME}:predict", {"instances": [ONE, [[0]]]}, 400, "28, 28, 1"),
        ("POST", f"/v1/models/{NAME}:predict", {"instances": [[[[256]] * 28] * 28]}, 400, "0..255"),
        ("POST", f"/v1/models/{NAME}:predict", {"instances": [[[[-1]] * 28] * 28]}, 400, "0..255"),
        ("POST", f"/v1/models/{NAME}:predict", {"instances": [{"image": ONE}]}, 400, "'pixels'"),
        ("POST", f"/v1/models/{NAME}:predict", {"instances": [ONE], "x": 1}, 400, "unknown field"),
        (
            "POST",
            f"/v1/models/{NAME}:predict",
            {"instances": [ONE], "signature_name": "classify"},
            400,
            "'classify' not found",
        ),
        ("POST", "/v1/models/other:predict", {"instances": [ONE]}, 404, "'other'"),
        ("POST", f"/v1/models/{NAME}/versions/2:predict", {"instances": [ONE]}, 404, "version"),
        ("POST", f"/v1/models/{NAME}:classify", {"instances": [ONE]}, 404, ":classify"),
        ("GET", f"/v1/models/{NAME}:predict", None, 405, "use POST"),
        ("POST", f"/v1/models/{NAME}", b"", 405, "use GET"),
        ("GET", "/etc/passwd", None, 404, "no such path"),
        ("GET", "/static/../../pyproject.toml", None, 404, "no such path"),
    ],
)
def test_bad_requests_get_a_4xx_naming_what_was_expected(
    server, method, path, body, status, message
):
    got, answer = server(method, path, body)
    assert got == status, answer
    assert message in answer["error"]
    assert server("GET", f"/v1/models/{NAME}")[0] == 200  # still serving


def test_a_body_over_the_limit_is_413_before_it_is_sent(server):
    # Only the headers: the answer must come without the server waiting for the body.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(
            f"POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
        )
        answer = raw.makefile("rb").read()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert f"{MAX_BODY:,}" in json.loads(body)["error"]


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)
_bodies = st.one_of(
    st.binary(max_size=200),
    _json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(
        st.sampled_from(["instances", "inputs", "signature_name", "x"]), _json_values
    ).map(lambda v: json.dumps(v).encode()),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_bodies)
def test_fuzzed_bodies_get_4xx_and_the_server_stays_up(server, body):
    status, answer = server("POST", f"/v1/models/{NAME}:predict", body)
    assert 400 <= status < 500, (status, answer)
    assert isinstance(answer, dict) and answer["error"]
    assert server("GET", f"/v1/models/{NAME}")[0] == 200


def _png(image: Image.Image, **save) -> bytes:
    blob = io.BytesIO()
    image.save(blob, format="PNG", **save)
    return blob.getvalue()


def _multipart(field: str, filename: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = "cnnmnist-test-boundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_images_get_the_answer_predict_json_gives(server, trained, tmp_path, mnist):
    # A test digit as a user would photograph it: dark on light paper, larger, stored sideways
    # with an EXIF Orientation tag (6: turn 90 degrees clockwise to view).
    upright = Image.fromarray(255 - mnist.test_images[7]).resize((120, 120), Image.BILINEAR)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = _png(upright.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    path = tmp_path / "photo.png"
    path.write_bytes(photo)
    cli_result = CliRunner().invoke(
        cli, ["predict", "--model", str(trained.checkpoint), "--json", str(path)]
    )
    want = json.loads(cli_result.stdout)[0]
    assert want["digit"] == int(mnist.test_labels[7])  # upright, it is read correctly

    status, raw = server("POST", "/predict", photo, {"Content-Type": "image/png"})
    assert status == 200, raw
    body, headers = _multipart("image", "photo.png", photo)
    status, form = server("POST", "/predict", body, headers)
    assert status == 200, form
    assert raw["file"] == "<upload>" and form["file"] == "photo.png"
    for answer in (raw, form):
        assert {k: v for k, v in answer.items() if k != "file"} == {
            k: v for k, v in want.items() if k != "file"
        }
    status, with_pixels = server("POST", "/predict?pixels=1", photo, {"Content-Type": "image/png"})
    assert np.array(with_pixels["pixels"]).shape == (28, 28)


@pytest.mark.parametrize(
    "body, headers, status, message",
    [
        (b"not an image", {"Content-Type": "image/png"}, 400, "not an image"),
        (b"", {"Content-Type": "image/png"}, 400, "empty"),
        (_png(Image.new("L", (1, 1))), {"Content-Type": "text/plain"}, 415, "image/*"),
        (*_multipart("file", "a.png", _png(Image.new("L", (9, 9)))), 400, "field named 'image'"),
    ],
)
def test_bad_images_get_a_4xx(server, body, headers, status, message):
    got, answer = server("POST", "/predict", body, headers)
    assert got == status and message in answer["error"], answer


def test_a_decompression_bomb_is_refused_before_decoding(server):
    from cnnmnist.preprocess.read import MAX_PIXELS

    side = int(MAX_PIXELS**0.5) + 100
    bomb = _png(Image.new("1", (side, side)))  # compresses to a few hundred KiB
    status, answer = server("POST", "/predict", bomb, {"Content-Type": "image/png"})
    assert status == 400 and "decompression bomb" in answer["error"]


def test_concurrent_requests_all_answered_in_order(server, reference, mnist):
    pixels = _digits(mnist, 40)
    want = reference.probabilities(pixels)

    def ask(i):
        status, body = server(
            "POST", f"/v1/models/{NAME}:predict", {"instances": [pixels[i].tolist()]}
        )
        return i, status, body

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, [i % 40 for i in range(400)]))
    assert len(answers) == 400 and all(status == 200 for _, status, _ in answers)
    for i, _, body in answers:  # each client got its own image's answer
        np.testing.assert_allclose(body["predictions"][0], want[i], atol=1e-5)


def test_the_page_and_its_files_are_served(server):
    status, page = server("GET", "/")
    assert status == 200 and b"<canvas" in page and b"app.js" in page
    for asset in ("/app.js", "/style.css"):
        assert server("GET", asset)[0] == 200


def _serve(ckpt, *args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "cnnmnist", "serve", str(ckpt), *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


ADDRESS = re.compile(r"^serving .* at http://127\.0\.0\.1:(\d+)/$")
BANNER_END = "Ctrl-C stops it"


def _address(process) -> tuple[int, str]:
    """The port of the banner's first line, `serving CKPT (RUNNER) at URL/`, and that line
    (what `serve` says before it, loading the model, is status)."""
    while line := process.stderr.readline():
        if match := ADDRESS.match(line.rstrip("\n")):
            return int(match.group(1)), line
    raise AssertionError("serve ended without saying where it listens")


def _banner(process) -> tuple[int, list[str]]:
    """The port `serve` announces, and its banner's lines (through "Ctrl-C stops it"): the
    first names the address, the others (indented) where the page and the APIs are."""
    port, first = _address(process)
    lines = [first]
    while lines[-1] and not lines[-1].startswith(BANNER_END):
        lines.append(process.stderr.readline())
    return port, lines


def _only_stopped(rest: str) -> bool:
    """Whether what `serve` said after its first line is at most the rest of its banner,
    then "stopped": nothing else (no warning, no traceback, no native log line)."""
    lines = [line for line in rest.splitlines() if line.strip()]
    banner = all(line.startswith("  ") or line == BANNER_END for line in lines[:-1])
    return lines[-1:] == ["stopped"] and banner


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_starts_quietly_stops_cleanly_and_refuses_a_busy_port(trained, stop):
    process = _serve(trained.checkpoint, "--port", "0")
    port, banner = _banner(process)
    # Answers from the TFLite copy, without TensorFlow.
    assert banner[0] == f"serving {trained.checkpoint} (tflite) at http://127.0.0.1:{port}/\n"
    assert _only_stopped("".join(banner[1:]) + "stopped")  # where the page and APIs are
    assert f"http://127.0.0.1:{port}/v1/models/{NAME}" in "".join(banner)
    assert Client(port)("GET", f"/v1/models/{NAME}")[0] == 200

    busy = _serve(trained.checkpoint, "--port", str(port))
    _, err = busy.communicate(timeout=60)
    assert busy.returncode == 1 and f"127.0.0.1:{port} is already in use" in err
    assert "Traceback" not in err

    process.send_signal(stop)
    rest = process.communicate(timeout=30)[1]
    assert process.returncode == 0 and rest.strip() == "stopped"
    assert not [b for b in banner if "XNNPACK" in b]


def test_serve_binds_to_loopback_by_default(trained):
    process = _serve(trained.checkpoint, "--port", "0")
    try:
        port, _ = _address(process)
        assert _listening(port) == ["127.0.0.1"]  # not 0.0.0.0: no other machine reaches it
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=30)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_at_once_after_the_address_ends_serve_with_exit_0(trained, stop):
    # The first moments after the address line are when start-up still runs; a signal
    # there once left the server hung, or ended it with 130.
    for _ in range(3):
        process = _serve(trained.checkpoint, "--port", "0")
        _address(process)
        process.send_signal(stop)  # at once after the address line, not after the banner
        rest = process.communicate(timeout=10)[1]
        assert process.returncode == 0 and _only_stopped(rest), rest


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_announcing_ends_run_without_an_exception(trained, stop):
    running = _in_process(trained.checkpoint)
    model = running.servables.current
    before = signal.getsignal(stop)
    running.run(announce=lambda: os.kill(os.getpid(), stop))  # returns: no KeyboardInterrupt
    assert signal.getsignal(stop) is before  # the caller's handlers are back
    assert running.socket.fileno() == -1  # closed
    with pytest.raises(RuntimeError, match="shutdown"):  # the model's thread is released
        model.run._thread.submit(print)


def _listening(port: int) -> list[str]:
    """The IPv4 addresses with a socket listening on `port`, from the kernel's own table."""
    addresses = []
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            addresses.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return addresses


def test_serve_without_its_extra_says_how_to_get_it(trained, monkeypatch):
    without_package(monkeypatch, "uvicorn")
    result = CliRunner().invoke(cli, ["serve", str(trained.checkpoint), "--port", "0"])
    assert result.exit_code == 1, result.output
    assert "needs uvicorn: pip install 'cnnmnist[serve]'" in result.output


def test_without_the_tflite_copy_the_savedmodel_answers(trained, tmp_path, reference, mnist):
    import shutil

    from cnnmnist.checkpoint import TFLITE

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained.checkpoint, ckpt)
    (ckpt / TFLITE).unlink()
    running = _in_process(ckpt)
    assert running.servables.current.runner.name == "savedmodel"
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        pixels = _digits(mnist, 3)
        status, body = Client(running.port)(
            "POST", f"/v1/models/{NAME}:predict", {"instances": pixels.tolist()}
        )
        assert status == 200, body
        np.testing.assert_allclose(body["predictions"], reference.probabilities(pixels), atol=1e-5)
    finally:
        running.close()
        thread.join(timeout=10)
