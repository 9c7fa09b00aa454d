"""The cluster a run belongs to (stdlib only): TF_CONFIG, this process's role (the chief
writes), device names. A bad TF_CONFIG or --devices fails here, before TensorFlow loads.

Managed platforms (Vertex AI custom training, Kubeflow's TFJob) start the same command on
every machine and describe the cluster in the TF_CONFIG environment variable;
MultiWorkerMirroredStrategy (training.distribute) reads it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

from cnnmnist.errors import UsageError

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
        config = json.loads(raw)  # RecursionError: nested too deep for a cluster
        cluster, task = config["cluster"], config["task"]
        kind, index = task["type"], int(task["index"])
        hosts = cluster[kind]
        if not isinstance(hosts, list) or not 0 <= index < len(hosts):
            raise ValueError(f"task index {index} is not in cluster[{kind!r}]")
        if kind not in ("chief", "worker"):
            raise ValueError(f"task type {kind!r}: cnnmnist runs only chief and worker tasks")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, RecursionError) as e:
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


def addresses() -> list[str]:
    """Every task's address in TF_CONFIG, in TensorFlow's order: the chief, then workers."""
    cluster = tf_config()["cluster"]
    return [*cluster.get("chief", []), *cluster.get("worker", [])]


def canonical(device: str) -> str:
    """/gpu:0, /device:GPU:0 and /job:localhost/replica:0/task:0/device:GPU:0 alike: GPU:0."""
    return device.rsplit("/", 1)[-1].upper().removeprefix("DEVICE:")
