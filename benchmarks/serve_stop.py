"""Stopping `cnnmnist serve`: SIGINT or SIGTERM at many moments after it says where it listens,
idle and during requests; counts hangs, exit statuses and how long each stop took.

    python benchmarks/serve_stop.py CKPT [--tries 60] [--max-delay 2] [--out FILE]

Each try starts the server as a user would (`cnnmnist serve CKPT --port 0`), reads its stderr
until the line with its address, waits a delay from 0 to 2 s (spread over the tries, most of
them in the first tenths of a second, where start-up still runs), and sends SIGINT or SIGTERM
(alternating). One try in three has clients posting requests from the
moment the address is known. A server that has not exited 10 s after the signal is a hang (it
is then killed). After each exit the port must refuse connections. Writes
benchmarks/results/serve_stop.json.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from machine import describe

HERE = Path(__file__).resolve().parent
HANG = 10.0  # seconds after the signal
ADDRESS = re.compile(r"http://[^\s/]*:(\d+)")
BODY = json.dumps({"instances": [[[[0.0]] * 28] * 28]}).encode()


def _flood(port: int, stop: threading.Event, sent: list[int]) -> None:
    """Post one-image :predict requests until told to stop or the server goes."""
    while not stop.is_set():
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("POST", "/v1/models/cnnmnist:predict", BODY)
            connection.getresponse().read()
            sent[0] += 1
        except OSError:
            return


def one_try(ckpt: str, delay: float, signum: int, busy: bool) -> dict:
    """Start, wait `delay` after the address line, signal, and see what happens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "cnnmnist", "serve", ckpt, "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines, port = [], None
    while port is None:
        line = process.stderr.readline()
        if not line:
            process.wait()
            return {"delay_s": delay, "error": "exited before listening: " + "".join(lines)}
        lines.append(line)
        if match := ADDRESS.search(line):
            port = int(match.group(1))
    stop, sent, clients = threading.Event(), [0], []
    if busy:
        clients = [threading.Thread(target=_flood, args=(port, stop, sent)) for _ in range(4)]
        for client in clients:
            client.start()
    time.sleep(delay)
    process.send_signal(signum)
    signalled = time.perf_counter()
    try:
        rest = process.communicate(timeout=HANG)[1]
        hung = False
    except subprocess.TimeoutExpired:
        process.kill()
        rest = process.communicate()[1]
        hung = True
    stopped_in = time.perf_counter() - signalled
    stop.set()
    for client in clients:
        client.join()
    with socket.socket() as probe:
        still_open = probe.connect_ex(("127.0.0.1", port)) == 0
    return {
        "delay_s": round(delay, 3),
        "signal": signal.Signals(signum).name,
        "busy": busy,
        "requests_answered": sent[0],
        "hung": hung,
        "returncode": process.returncode,
        "stopped_in_s": round(stopped_in, 3),
        "port_open_after": still_open,
        "stderr_after": rest.strip().splitlines()[-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--tries", type=int, default=60)
    parser.add_argument("--max-delay", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "serve_stop.json")
    args = parser.parse_args()
    tries = []
    for k in range(args.tries):
        delay = args.max_delay * (k / max(1, args.tries - 1)) ** 2
        signum = signal.SIGINT if k % 2 == 0 else signal.SIGTERM
        result = one_try(args.ckpt, delay, signum, busy=k % 3 == 2)
        tries.append(result)
        print(json.dumps(result), flush=True)
    finished = [t for t in tries if "error" not in t]
    summary = {
        "command": f"python benchmarks/serve_stop.py CKPT --tries {args.tries} "
        f"--max-delay {args.max_delay:g}",
        "machine": describe(),
        "tries": len(tries),
        "failed_to_start": len(tries) - len(finished),
        "hangs": sum(t["hung"] for t in finished),
        "exit_statuses": dict(collections.Counter(str(t["returncode"]) for t in finished)),
        "port_open_after_exit": sum(t["port_open_after"] for t in finished),
        "slowest_stop_s": max((t["stopped_in_s"] for t in finished), default=None),
        "busy_tries": sum(t["busy"] for t in finished),
        "tried": tries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "tried"}, indent=2))


if __name__ == "__main__":
    main()
