"""Load on `cnnmnist serve`: concurrent clients on loopback sending single-image :predict requests
for a fixed time, over the REST API (JSON) or, with --grpc, TF Serving's gRPC API (through
its official client, tensorflow-serving-api); throughput, latency percentiles, errors and
the server's memory.

    python benchmarks/serve_load.py CKPT [--clients 16] [--seconds 20] [--grpc]

Clients are threads spread over a few processes (so the clients' own Python does not serialise
on one interpreter lock), each with a keep-alive connection, sending the same request body in
a loop. The server is started as a user would start it, `cnnmnist serve CKPT --port 0`, and its
resident memory is sampled every second from /proc. Writes the API's entry of
benchmarks/results/serve_load.json (the other API's entry stays).
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from machine import describe

HERE = Path(__file__).resolve().parent
PROCESSES = 4


def client_process(
    port: int, threads: int, seconds: float, body: bytes, results, go, grpc: bool = False
) -> None:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    if grpc:  # imported before the clock starts: TensorFlow takes seconds to import
        import grpc as rpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    results.put("ready")
    go.wait()
    deadline = time.perf_counter() + seconds

    def grpc_client() -> None:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            rpc.insecure_channel(f"127.0.0.1:{port}")
        )
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "cnnmnist"
        pixels = np.asarray(json.loads(body)["instances"], np.float32)
        request.inputs["pixels"].CopyFrom(tf.make_tensor_proto(pixels))
        mine, bad = [], []
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                answer = stub.Predict(request, 10)
                if tf.make_ndarray(answer.outputs["probabilities"]).shape != (1, 10):
                    bad.append("wrong shape")
            except Exception as e:  # noqa: BLE001 - every failure is counted, not raised
                bad.append(repr(e)[:200])
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine, bad = [], []
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                connection.request(
                    "POST",
                    "/v1/models/cnnmnist:predict",
                    body,
                    {"Content-Type": "application/json"},
                )
                response = connection.getresponse()
                answer = response.read()
                if response.status != 200 or len(json.loads(answer)["predictions"][0]) != 10:
                    bad.append(f"{response.status}: {answer[:100]!r}")
            except Exception as e:  # noqa: BLE001 - every failure is counted, not raised
                bad.append(repr(e))
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    workers = [threading.Thread(target=grpc_client if grpc else client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    results.put((latencies, errors))


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (the quiet filter is one)."""
    total = 0
    for p in [pid, *_children(pid)]:
        try:
            text = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        total += int(re.search(r"VmRSS:\s+(\d+)", text).group(1))
    return total / 1024


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _preset(ckpt: Path) -> str | None:
    try:
        return json.loads((ckpt / "cnnmnist.json").read_text()).get("preset")
    except (OSError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt", type=Path)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--grpc", action="store_true", help="load the gRPC API, not REST")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_load.json")
    args = parser.parse_args()

    command = [sys.executable, "-m", "cnnmnist", "serve", str(args.ckpt), "--port", "0"]
    server = subprocess.Popen(
        command + (["--grpc-port", "0"] if args.grpc else []), stderr=subprocess.PIPE, text=True
    )
    started = time.perf_counter()
    banner = ""
    while "Ctrl-C" not in banner:  # the banner names the ports, then how to stop
        banner += server.stderr.readline()
    ready_s = time.perf_counter() - started
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", banner).group(1))
    if args.grpc:
        port = int(re.search(r"gRPC API +127\.0\.0\.1:(\d+)", banner).group(1))
    engine = re.search(r"\((\w+)\) at", banner).group(1)
    said: list[str] = []  # the server's stderr, drained so that it never blocks on the pipe
    threading.Thread(target=lambda: said.extend(server.stderr), daemon=True).start()

    # One MNIST-like image: a stroke, pixel values 0..255, the JSON a client would send.
    pixels = np.zeros((28, 28, 1))
    pixels[6:22, 13:16] = 255.0
    body = json.dumps({"instances": [pixels.tolist()]}).encode()

    memory = [rss_mib(server.pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            memory.append(rss_mib(server.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    results: multiprocessing.Queue = multiprocessing.Queue()
    go = multiprocessing.Event()  # every client process starts once all are ready
    per = [args.clients // PROCESSES + (k < args.clients % PROCESSES) for k in range(PROCESSES)]
    procs = [
        multiprocessing.Process(
            target=client_process, args=(port, n, args.seconds, body, results, go, args.grpc)
        )
        for n in per
        if n
    ]
    for p in procs:
        p.start()
    for _ in procs:
        results.get()  # "ready"
    go.set()
    t0 = time.perf_counter()
    collected = [results.get() for _ in procs]
    elapsed = time.perf_counter() - t0
    for p in procs:
        p.join()
    stop.set()
    sampler.join()
    server.terminate()
    server.wait()

    latencies = np.array([x for lat, _ in collected for x in lat]) * 1000
    errors = [e for _, errs in collected for e in errs]
    record = {
        "command": f"python benchmarks/serve_load.py CKPT --clients {args.clients} "
        f"--seconds {args.seconds:g}" + (" --grpc" if args.grpc else ""),
        "api": "grpc" if args.grpc else "rest",
        "checkpoint": {"preset": _preset(args.ckpt)},
        "engine": engine,
        "clients": args.clients,
        "seconds": round(elapsed, 2),
        "requests": int(len(latencies)),
        "errors": len(errors),
        "first_errors": errors[:5],
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": {
            q: round(float(np.percentile(latencies, p)), 2)
            for q, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
        },
        "server_ready_s": round(ready_s, 3),
        "server_stderr_lines": len(said),
        "server_stderr_first": said[:3],
        "server_rss_mib": {
            "start": round(memory[0], 1),
            "end": round(memory[-1], 1),
            "max": round(max(memory), 1),
            "per_second": [round(m, 1) for m in memory],
        },
        "machine": describe(),
    }
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous = previous if "rest" in previous or "grpc" in previous else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(previous | {record["api"]: record}, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
