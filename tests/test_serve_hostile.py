"""`serve` against a hostile stranger: a web page on another site, a name rebound to
127.0.0.1, decoders that should never run, and requests built to take the server's time,
memory or connections. Each is refused quickly, and a one-image request still gets in."""

from __future__ import annotations

import http.client
import io
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest

from cnnmnist.server import listen
from cnnmnist.server.listen import Options, open_server

NAME = "cnnmnist"
ONE = json.dumps({"instances": [[[[0.0]] * 28] * 28]}).encode()


@pytest.fixture(scope="module")
def guarded(trained):
    """A server as `serve` makes it by default (Host checked, no other origin allowed), with
    a short deadline for a request's head; its port."""
    original = listen.HEAD_TIMEOUT
    listen.HEAD_TIMEOUT = 1.0
    running, _ = open_server(trained.checkpoint, "127.0.0.1", 0, Options(name=NAME), print)
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    yield running.port
    running.close()
    thread.join(timeout=10)
    listen.HEAD_TIMEOUT = original


def ask(port, method, path, body=None, headers=None, timeout=30):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body, headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, data, dict(response.getheaders())
    finally:
        connection.close()


def _one_image_answers(port) -> bool:
    status, data, _ = ask(port, "POST", f"/v1/models/{NAME}:predict", ONE, timeout=10)
    return status == 200 and len(json.loads(data)["predictions"][0]) == 10


def test_a_page_on_another_site_cannot_post_to_the_server(guarded):
    png = _png()
    for kind, body in (
        ("image/png", png),
        ("text/plain", ONE),  # a form or fetch a page may send without asking first
        ("application/x-www-form-urlencoded", b"a=1"),
    ):
        status, data, headers = ask(
            guarded,
            "POST",
            "/predict" if kind == "image/png" else f"/v1/models/{NAME}:predict",
            body,
            {"Content-Type": kind, "Origin": "https://evil.example"},
        )
        assert status == 403 and b"another site" in data
        assert "access-control-allow-origin" not in headers
    # The server's own page (same origin) and clients that are not browsers pass.
    own = {"Content-Type": "image/png", "Origin": f"http://127.0.0.1:{guarded}"}
    assert ask(guarded, "POST", "/predict", png, own)[0] == 200
    assert _one_image_answers(guarded)


def test_a_name_rebound_to_this_machine_is_refused(guarded):
    status, data, _ = ask(guarded, "GET", "/", headers={"Host": f"evil.example:{guarded}"})
    assert status == 403 and b"does not answer to the host name" in data
    for host in (f"localhost:{guarded}", f"127.0.0.1:{guarded}"):
        assert ask(guarded, "GET", "/", headers={"Host": host})[0] == 200


def test_allowed_origins_get_cors_and_a_preflight(trained):
    origin = "https://example.org"
    running, _ = open_server(
        trained.checkpoint, "127.0.0.1", 0, Options(name=NAME, allow_origins=(origin,)), print
    )
    thread = threading.Thread(target=running.run, daemon=True)
    thread.start()
    try:
        headers = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        status, _, answer = ask(
            running.port, "OPTIONS", f"/v1/models/{NAME}:predict", None, headers
        )
        assert status == 204 and answer["access-control-allow-origin"] == origin
        status, _, answer = ask(
            running.port, "POST", f"/v1/models/{NAME}:predict", ONE, {"Origin": origin}
        )
        assert status == 200 and answer["access-control-allow-origin"] == origin
        other = {"Origin": "https://evil.example"}
        assert ask(running.port, "POST", f"/v1/models/{NAME}:predict", ONE, other)[0] == 403
    finally:
        running.close()
        thread.join(timeout=10)


def _png() -> bytes:
    from PIL import Image

    image = Image.new("L", (60, 60), 255)
    image.paste(0, (25, 10, 35, 50))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _eps() -> bytes:
    return b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"


def _ico(side: int = 13_000) -> bytes:
    """An .ico whose one entry is a PNG declaring side x side black pixels (1 bit deep)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    raw = zlib.compress((b"\x00" * (1 + (side + 7) // 8)) * side, 9)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    png += chunk(b"IDAT", raw) + chunk(b"IEND", b"")
    return (
        struct.pack("<HHH", 0, 1, 1)
        + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
        + png
    )


@pytest.mark.parametrize(
    "make, kind",
    [(_eps, "application/postscript"), (_eps, "image/x-eps"), (_ico, "image/x-icon")],
    ids=["eps", "eps as an image", "ico bomb"],
)
def test_formats_predict_does_not_document_are_never_decoded(guarded, make, kind, monkeypatch):
    body = make()
    ran = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: ran.append(a) or 1 / 0)
    started = time.perf_counter()
    status, data, _ = ask(guarded, "POST", "/predict", body, {"Content-Type": kind})
    assert status in (400, 415) and time.perf_counter() - started < 2
    answer = json.loads(data)["error"]
    assert "Ghostscript" not in answer and "/tmp" not in answer and "Traceback" not in answer
    assert ran == []  # no external program (Ghostscript) was started


def test_a_form_of_a_hundred_thousand_parts_is_refused_at_once(guarded):
    part = b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n'
    body = part * 100_000 + b"--B--\r\n"
    started = time.perf_counter()
    status, data, _ = ask(
        guarded, "POST", "/predict", body, {"Content-Type": "multipart/form-data; boundary=B"}
    )
    assert status == 400 and b"malformed multipart form" in data
    assert time.perf_counter() - started < 5
    assert _one_image_answers(guarded)


def test_a_body_of_millions_of_empty_lists_is_refused_before_parsing(guarded):
    body = b'{"inputs": [' + b"[]," * 5_000_000 + b"[]]}"
    started = time.perf_counter()
    status, data, _ = ask(guarded, "POST", f"/v1/models/{NAME}:predict", body)
    assert status == 413 and b"images' worth of values" in data
    assert time.perf_counter() - started < 5


def test_a_one_image_request_does_not_wait_behind_a_long_one(guarded, mnist):
    images = np.repeat(mnist.test_images[:1], 1024, axis=0).reshape(-1, 28, 28, 1)
    long = json.dumps({"instances": images.astype(float).tolist()}).encode()
    waits = []

    def flood() -> None:
        for _ in range(3):
            ask(guarded, "POST", f"/v1/models/{NAME}:predict", long)

    flooding = threading.Thread(target=flood)
    flooding.start()
    while flooding.is_alive():
        started = time.perf_counter()
        assert _one_image_answers(guarded)
        waits.append(time.perf_counter() - started)
    flooding.join()
    assert waits and max(waits) < 1.0, waits  # a 5,200-image request once held it 3.5 s


def test_a_connection_that_sends_nothing_is_closed(guarded):
    with socket.create_connection(("127.0.0.1", guarded), timeout=10) as idle:
        started = time.perf_counter()
        assert idle.recv(100) == b""  # closed by the server, after its head deadline
        assert 0.5 < time.perf_counter() - started < 5
    with socket.create_connection(("127.0.0.1", guarded), timeout=10) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head, never finished
        started = time.perf_counter()
        assert slow.recv(100) == b""
        assert time.perf_counter() - started < 5


def test_a_stalled_body_gets_408(guarded, monkeypatch):
    from cnnmnist.server import app

    monkeypatch.setattr(app, "BODY_TIMEOUT", 1.0)
    with socket.create_connection(("127.0.0.1", guarded), timeout=10) as stalled:
        stalled.sendall(
            f"POST /v1/models/{NAME}:predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Length: 1000\r\n\r\n{".encode()
        )
        answer = stalled.recv(1000)
    assert answer.startswith(b"HTTP/1.1 408") and b"not sent within" in answer


def test_idle_connections_cannot_lock_clients_out(guarded, monkeypatch):
    monkeypatch.setattr(listen._Protocol, "room", 20)
    held = [socket.create_connection(("127.0.0.1", guarded), timeout=10) for _ in range(40)]
    try:
        assert _one_image_answers(guarded)  # the longest-idle ones made room
    finally:
        for s in held:
            s.close()


def test_head_options_a_malformed_request_and_a_bug_are_answered_in_json(guarded):
    status, data, headers = ask(guarded, "HEAD", "/")
    assert status == 200 and data == b"" and headers["content-type"].startswith("text/html")
    status, _, headers = ask(guarded, "OPTIONS", "/predict")
    assert status == 204 and "POST" in headers["allow"]
    with socket.create_connection(("127.0.0.1", guarded), timeout=10) as raw:
        raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = raw.recv(1000)
    assert answer.startswith(b"HTTP/1.1 400") and b'{"error":"malformed HTTP request"}' in answer
    assert ask(guarded, "GET", "/favicon.ico")[0] == 200


def test_listening_everywhere_says_so(trained):
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cnnmnist",
            "serve",
            str(trained.checkpoint),
            "--host",
            "0",
            "--port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    banner = ""
    while "Ctrl-C" not in banner:
        line = process.stderr.readline()
        assert line, banner
        banner += line
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=20)
    assert re.search(r"at http://127\.0\.0\.1:\d+/", banner)  # a URL that opens here
    assert "listening on every network interface" in banner
    assert "http://:" not in banner
