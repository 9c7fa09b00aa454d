"""Choosing a tf.distribute strategy, and who writes: the chief of a multi-worker cluster.

Managed platforms (Vertex AI custom training, Kubeflow's TFJob) start the same command on
every machine and describe the cluster in the TF_CONFIG environment variable;
MultiWorkerMirroredStrategy reads it. Everything here but `strategy` is stdlib only, so a
bad TF_CONFIG fails before TensorFlow is imported.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from cnnmnist.errors import UsageError

STRATEGIES = ("auto", "one-device", "mirrored", "multi-worker")


@dataclass(frozen=True)
class Role:
    """This process's place in the cluster: worker `index` of `workers`; the chief writes."""

    index: int = 0
    workers: int = 1
    chief: bool = True


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
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = [gpu.name for gpu in tf.config.list_logical_devices("GPU")]
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
