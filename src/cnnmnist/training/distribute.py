"""The tf.distribute strategy a run trains under, and a worker's failure told as one line."""

from __future__ import annotations

import re
import subprocess
import sys

import tensorflow as tf

from cnnmnist.cluster import (
    PEER_TIMEOUT_ENV,
    Role,
    addresses,
    canonical,
    peer_timeout,
    role,
    tf_config,
)
from cnnmnist.errors import CnnmnistError, UsageError, tf_failure


def strategy(name: str, devices: tuple[str, ...] = ()):
    """The tf.distribute strategy for --strategy (and --devices, for one-device and mirrored)."""
    if name == "multi-worker":  # first: it must be created before TensorFlow's runtime starts
        if devices:
            raise UsageError("--devices: a multi-worker run uses every local GPU (or the CPU)")
        return _joined_cluster()
    gpus = [gpu.name for gpu in tf.config.list_logical_devices("GPU")]
    present = {canonical(d.name) for d in tf.config.list_logical_devices()}
    missing = [d for d in devices if canonical(d) not in present]
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


def _joined_cluster():
    """MultiWorkerMirroredStrategy, once every worker has joined; a worker whose peers do not
    all join within peer_timeout() exits 1 with a message.

    TensorFlow itself waits for them without limit inside one C++ call that holds the GIL (no
    Python thread runs, Ctrl-C is not seen). faulthandler's watchdog is a C thread: at the
    deadline it writes to a pipe and ends the process with exit 1; a small helper process
    reading that pipe then prints the message. When the cluster forms, the pipe closes empty.
    """
    import faulthandler

    me, seconds = role("multi-worker"), peer_timeout()
    message = (
        f"Error: worker {me.index}: not every worker in TF_CONFIG joined within {seconds:g} s "
        f"({', '.join(addresses())}); start the same command on each of them, check the "
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


# TensorFlow names a task in its errors as /job:worker/replica:0/task:1 or /job:worker/task:1.
_TASK = re.compile(r"/job:(chief|worker)(?:/replica:\d+)?/task:(\d+)")
# Errors a worker sees when another one failed or left in the middle of a collective.
_PEER_ERRORS = ("UnavailableError", "AbortedError", "CancelledError", "DeadlineExceededError")


def failure(error: BaseException, me: Role | None = None) -> CnnmnistError | None:
    """A TensorFlow runtime error in training as one line: under multi-worker, a peer's
    failure names the peer (whose own output has the cause); None if `error` is not
    TensorFlow's."""
    if not isinstance(error, tf.errors.OpError):
        return None
    me = me or Role()
    who = f"worker {me.index}: " if me.workers > 1 else ""
    if me.workers > 1 and type(error).__name__ in _PEER_ERRORS:
        cluster = tf_config()["cluster"]
        tasks = [("chief", i) for i in range(len(cluster.get("chief", [])))]
        tasks += [("worker", i) for i in range(len(cluster.get("worker", [])))]
        named = {(kind, int(index)) for kind, index in _TASK.findall(str(error))}
        peers = sorted({tasks.index(t) for t in named if t in tasks} - {me.index})
        if peers:
            names = ", ".join(f"worker {p} ({addresses()[p]})" for p in peers)
            return CnnmnistError(
                f"{who}stopped because {names} failed or left the run (its own output says "
                "why); nothing was written"
            )
    return CnnmnistError(f"{who}{tf_failure(error, 'training')}")
