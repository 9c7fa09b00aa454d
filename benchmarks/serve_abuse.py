"""Hostile loads on `cnnmnist serve`: what each costs the server in memory, and what a normal
one-image request waits meanwhile.

    python benchmarks/serve_abuse.py CKPT [--only NAME,...] [--out FILE]

Each load runs against a fresh server (`cnnmnist serve CKPT --port 0`, as a user starts it).
While it runs, a probe client sends a one-image :predict every 0.2 s and records how long
each took (or that it failed); the server's resident memory is sampled every 0.05 s from
/proc. The loads:

  multipart   a 16 MiB upload form of ~320,000 tiny parts, two at once
  ico         8 uploads at once of a 0.6 MB .ico that declares a 13,000 x 13,000 image
  json        8 bodies at once of 16 MiB of empty lists ({"inputs": [[], [], ...]})
  big         a request of 1,024 real-sized images, sent again and again by 2 clients
  idle        300 connections that send nothing, then 50 that trickle their headers, with
              the server limited to 256 open files

Writes benchmarks/results/serve_abuse.json.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import resource
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

from machine import describe

HERE = Path(__file__).resolve().parent
ONE = json.dumps({"instances": [[[[0.0]] * 28] * 28]}).encode()
LOAD_SECONDS = 20.0  # how long the probe keeps measuring after a load starts


def start(ckpt: str, files: int | None = None) -> tuple[subprocess.Popen, int]:
    """The server, as a user starts it; `files` caps its open files."""

    def limit():
        if files:
            resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    process = subprocess.Popen(
        [sys.executable, "-m", "cnnmnist", "serve", ckpt, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limit,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    while True:
        line = process.stderr.readline()
        if not line:
            raise RuntimeError("the server did not start")
        if match := re.search(r"http://[^\s/]*:(\d+)", line):
            threading.Thread(target=process.stderr.read, daemon=True).start()  # drain
            return process, int(match.group(1))


def rss_mib(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def post(port: int, path: str, body: bytes, kind: str, timeout: float = 120) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", path, body, {"Content-Type": kind})
        response = connection.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        connection.close()


def probe(port: int, stop: threading.Event, out: list) -> None:
    """A one-image request every 0.2 s: (seconds it took, or None when it failed)."""
    while not stop.is_set():
        started = time.perf_counter()
        status = post(port, "/v1/models/cnnmnist:predict", ONE, "application/json", timeout=60)
        out.append(time.perf_counter() - started if status == 200 else None)
        stop.wait(0.2)


def multipart_body() -> tuple[bytes, str]:
    part = b'--B\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n'
    body = part * (16 * 2**20 // len(part) - 1) + b"--B--\r\n"
    return body, "multipart/form-data; boundary=B"


def ico_body() -> bytes:
    """An .ico whose one entry is a PNG of 13,000 x 13,000 black pixels (1 bit deep)."""
    side = 13_000

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = (b"\x00" + b"\x00" * ((side + 7) // 8)) * side
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 6 + 16)
    return header + entry + png


def json_body() -> bytes:
    n = (16 * 2**20 - 20) // 3
    return b'{"inputs": [' + b"[]," * n + b"[]]}"


def big_body() -> bytes:
    image = [[[float(v % 256)] for v in range(row, row + 28)] for row in range(28)]
    return json.dumps({"instances": [image] * 1024}).encode()


def idle(port: int, stop: threading.Event) -> None:
    """300 silent connections, then 50 that send their headers a byte a second."""
    held = []
    for _ in range(300):
        try:
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            break
    trickling = []
    for _ in range(50):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            trickling.append(s)
        except OSError:
            break
    head = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 60 + b"\r\n\r\n"
    for k in range(len(head)):
        if stop.wait(1.0):
            break
        for s in trickling:
            try:
                s.send(head[k : k + 1])
            except OSError:
                pass
    for s in held + trickling:
        s.close()


def run_load(ckpt: str, name: str) -> dict:
    files = 256 if name == "idle" else None
    process, port = start(ckpt, files)
    samples, latencies, stop = [], [], threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            samples.append(rss_mib(process.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    baseline = rss_mib(process.pid)
    prober = threading.Thread(target=probe, args=(port, stop, latencies))
    statuses: list[int] = []
    attackers = []
    if name == "multipart":
        body, kind = multipart_body()
        attackers = [lambda: statuses.append(post(port, "/predict", body, kind))] * 2
    elif name == "ico":
        body = ico_body()
        attackers = [lambda: statuses.append(post(port, "/predict", body, "image/x-icon"))] * 8
    elif name == "json":
        body = json_body()
        path = "/v1/models/cnnmnist:predict"
        attackers = [lambda: statuses.append(post(port, path, body, "application/json"))] * 8
    elif name == "big":
        body, path = big_body(), "/v1/models/cnnmnist:predict"

        def again():
            while not stop.is_set():
                statuses.append(post(port, path, body, "application/json"))

        attackers = [again] * 2
    elif name == "idle":
        attackers = [lambda: idle(port, stop)]
    threads = [threading.Thread(target=a, daemon=True) for a in attackers]
    started = time.perf_counter()
    for t in threads:
        t.start()
    prober.start()
    time.sleep(LOAD_SECONDS)
    stop.set()
    prober.join()
    for t in threads:
        t.join(timeout=60)
    sampler.join()
    process.terminate()
    process.wait(timeout=30)
    answered = [x for x in latencies if x is not None]
    return {
        "load": name,
        "seconds": round(time.perf_counter() - started, 1),
        "attack_statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "rss_mib": {"before": round(baseline, 1), "peak": round(max(samples, default=0), 1)},
        "probe": {
            "sent": len(latencies),
            "failed": len(latencies) - len(answered),
            "median_ms": round(1000 * statistics.median(answered), 1) if answered else None,
            "max_ms": round(1000 * max(answered), 1) if answered else None,
        },
    }


LOADS = ("multipart", "ico", "json", "big", "idle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--only", default=",".join(LOADS))
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_abuse.json")
    args = parser.parse_args()
    results = []
    for name in args.only.split(","):
        result = run_load(args.ckpt, name)
        results.append(result)
        print(json.dumps(result), flush=True)
    record = {
        "command": "python benchmarks/serve_abuse.py CKPT"
        + (f" --only {args.only}" if args.only != ",".join(LOADS) else ""),
        "machine": describe(),
        "probe_every_s": 0.2,
        "load_seconds": LOAD_SECONDS,
        "loads": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
