"""Choosing a tf.distribute strategy; who writes (the chief); how workers join and fail.

Managed platforms (Vertex AI custom training, Kubeflow's TFJob) start the same command on
every machine and describe the cluster in the TF_CONFIG environment variable;
MultiWorkerMirroredStrategy reads it. Everything here but `strategy` is stdlib only, so a
bad TF_CONFIG fails before TensorFlow is imported.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

from cnnmnist.errors import CnnmnistError, UsageError

STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")
# How long a multi-worker run waits for every worker in TF_CONFIG to join before giving up.
PEER_TIMEOUT_ENV = "CNNMNIST_PEER_TIMEOUT"
PEER_TIMEOUT = 300.0  # seconds: platforms may start the workers' containers minutes apart


@dataclass(frozen=True)
class Role:
    """This process's place in the cluster: worker `index` of `workers`; the chief writes."""

    index: int = 0
    workers: int = 1
    chief: bool = True


# A device as --devices names it: /gpu:0, /cpu:0, /device:GPU:1, /job:worker/replica:0/task:1/gpu:0.
_DEVICE = re.compile(r"(/job:\w+(/replica:\d+)?(/task:\d+)?)?/(device:)?(cpu|gpu):\d+", re.I)


def parse_devices(value: str | None) -> tuple[str, ...]:
    """The devices of a comma-separated --devices value, each checked for form."""
    devices = tuple(d.strip() for d in (value or "").split(",") if d.strip())
    bad = [d for d in devices if not _DEVICE.fullmatch(d)]
    if bad:
        raise UsageError(
            f"{', '.join(map(repr, bad))} is not a device name; use names such as /gpu:0 or /cpu:0"
        )
    if len(set(d.lower() for d in devices)) != len(devices):
        raise UsageError(f"a device is named twice in {value!r}")
    return devices


def tf_config(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """TF_CONFIG parsed and checked: a cluster with workers, and this process's task in it."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    if not raw:
        raise UsageError(
            "--strategy multi-worker needs TF_CONFIG, which describes the cluster and this "
            'worker, e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
            '"task": {"type": "worker", "index": 0}} (see README: Training on several machines)'
        )
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        kind, index = task["type"], int(task["index"])
        hosts = cluster[kind]
        if not isinstance(hosts, list) or not 0 <= index < len(hosts):
            raise ValueError(f"task index {index} is not in cluster[{kind!r}]")
        if kind not in ("chief", "worker"):
            raise ValueError(f"task type {kind!r}: cnnmnist runs only chief and worker tasks")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"TF_CONFIG is not a valid cluster description: {e}") from None
    return config


def role(strategy: str, environ: dict[str, str] | None = None) -> Role:
    """Who this process is; TensorFlow's rule: the `chief` task, or worker 0 if there is none."""
    if strategy != "multi-worker":
        return Role()
    config = tf_config(environ)
    cluster, task = config["cluster"], config["task"]
    ordered = cluster.get("chief", []) + cluster.get("worker", [])
    index = int(task["index"]) + (len(cluster.get("chief", [])) if task["type"] == "worker" else 0)
    chief = task["type"] == "chief" or ("chief" not in cluster and int(task["index"]) == 0)
    return Role(index=index, workers=len(ordered), chief=chief)


def strategy(name: str, devices: tuple[str, ...] = ()):
    """The tf.distribute strategy for --strategy (and --devices, for one-device and mirrored)."""
    import tensorflow as tf

    if name == "multi-worker":  # first: it must be created before TensorFlow's runtime starts
        if devices:
            raise UsageError("--devices: a multi-worker run uses every local GPU (or the CPU)")
        return _joined_cluster()
    gpus = [gpu.name for gpu in tf.config.list_logical_devices("GPU")]
    present = {_canonical(d.name) for d in tf.config.list_logical_devices()}
    missing = [d for d in devices if _canonical(d) not in present]
    if missing:
        raise CnnmnistError(
            f"--devices: {', '.join(missing)} not on this machine; TensorFlow sees "
            f"{', '.join(sorted(present))}"
        )
    if name == "auto" and devices:
        name = "mirrored" if len(devices) > 1 else "one-device"
    elif name == "auto":
        name = "mirrored" if len(gpus) > 1 else "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one-device":
        if len(devices) > 1:
            raise UsageError(f"--strategy one-device takes one device, not {len(devices)}")
        return tf.distribute.OneDeviceStrategy(devices[0] if devices else (gpus or ["/cpu:0"])[0])
    return tf.distribute.MirroredStrategy(list(devices) or None)


def peer_timeout(environ: dict[str, str] | None = None) -> float:
    """Seconds to wait for the other workers ($CNNMNIST_PEER_TIMEOUT, default PEER_TIMEOUT)."""
    raw = (os.environ if environ is None else environ).get(PEER_TIMEOUT_ENV)
    if raw is None:
        return PEER_TIMEOUT
    try:
        seconds = float(raw)
        if not seconds > 0:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"{PEER_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds"
        ) from None
    return seconds


def _joined_cluster():
    """MultiWorkerMirroredStrategy, once every worker has joined; a worker whose peers do not
    all join within peer_timeout() exits 1 with a message.

    TensorFlow itself waits for them without limit inside one C++ call that holds the GIL (no
    Python thread runs, Ctrl-C is not seen). faulthandler's watchdog is a C thread: at the
    deadline it writes to a pipe and ends the process with exit 1; a small helper process
    reading that pipe then prints the message. When the cluster forms, the pipe closes empty.
    """
    import faulthandler
    import subprocess

    import tensorflow as tf

    me, seconds = role("multi-worker"), peer_timeout()
    message = (
        f"Error: worker {me.index}: not every worker in TF_CONFIG joined within {seconds:g} s "
        f"({', '.join(_addresses())}); start the same command on each of them, check the "
        f"addresses, or wait longer with {PEER_TIMEOUT_ENV}=SECONDS\n"
    )
    helper = subprocess.Popen(
        [sys.executable, "-c", _SAY_IF_TIMED_OUT, message], stdin=subprocess.PIPE
    )
    faulthandler.dump_traceback_later(seconds, exit=True, file=helper.stdin)
    try:
        engine = tf.distribute.MultiWorkerMirroredStrategy()
        # The strategy can be made before the others are there; an all-reduce cannot.
        engine.reduce("SUM", tf.function(engine.run)(lambda: tf.constant(1.0)), axis=None)
    finally:
        faulthandler.cancel_dump_traceback_later()
        helper.stdin.close()
        helper.wait()
    return engine


_SAY_IF_TIMED_OUT = "import sys\nif sys.stdin.buffer.read():\n    sys.stderr.write(sys.argv[1])"


def _addresses() -> list[str]:
    cluster = tf_config()["cluster"]
    return [*cluster.get("chief", []), *cluster.get("worker", [])]


# TensorFlow names a task in its errors as /job:worker/replica:0/task:1 or /job:worker/task:1.
_TASK = re.compile(r"/job:(chief|worker)(?:/replica:\d+)?/task:(\d+)")
# Errors a worker sees when another one failed or left in the middle of a collective.
_PEER_ERRORS = ("UnavailableError", "AbortedError", "CancelledError", "DeadlineExceededError")
# The lines of a TensorFlow error message that are not the message: where the op was made.
_BOILERPLATE = re.compile(r"(Graph execution error|Detected at node|File \"|\[\[)")


def failure(
    error: BaseException, me: Role = Role(), doing: str = "training"
) -> CnnmnistError | None:
    """A TensorFlow runtime error as one line: under multi-worker, a peer's failure names the
    peer (whose own output has the cause); None if `error` is not TensorFlow's."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(error, tf.errors.OpError):
        return None
    text = str(error)
    who = f"worker {me.index}: " if me.workers > 1 else ""
    if me.workers > 1 and type(error).__name__ in _PEER_ERRORS:
        cluster = tf_config()["cluster"]
        tasks = [("chief", i) for i in range(len(cluster.get("chief", [])))]
        tasks += [("worker", i) for i in range(len(cluster.get("worker", [])))]
        named = {(kind, int(index)) for kind, index in _TASK.findall(text)}
        peers = sorted({tasks.index(t) for t in named if t in tasks} - {me.index})
        if peers:
            names = ", ".join(f"worker {p} ({_addresses()[p]})" for p in peers)
            return CnnmnistError(
                f"{who}stopped because {names} failed or left the run (its own output says "
                "why); nothing was written"
            )
    lines = [line.strip() for line in text.splitlines()]
    message = next((line for line in lines if line and not _BOILERPLATE.match(line)), "")
    return CnnmnistError(f"{who}{doing} failed: {type(error).__name__}: {message}")


def _canonical(device: str) -> str:
    """/gpu:0, /device:GPU:0 and /job:localhost/replica:0/task:0/device:GPU:0 alike: GPU:0."""
    return device.rsplit("/", 1)[-1].upper().removeprefix("DEVICE:")
