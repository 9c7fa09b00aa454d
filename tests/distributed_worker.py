"""Run `cnnmnist` as one process of a distributed test (started by tests/test_distribute.py).

    python tests/distributed_worker.py [--logical-cpus N] [--record-shards FILE]
        [--fail-in-validation] ARGS...

--logical-cpus splits the CPU into N logical devices before TensorFlow starts (as a machine
with N accelerators would look to MirroredStrategy). --record-shards saves, at exit, the
training-image indices this process's input pipeline produced, epoch by epoch, as the
pipeline hands them to the gather that reads the images. --fail-in-validation makes the
first validation pass raise a TensorFlow error (a fault in one worker).
"""

from __future__ import annotations

import atexit
import sys

import numpy as np


def main(argv: list[str]) -> None:
    import tensorflow as tf

    if argv[:1] == ["--logical-cpus"]:
        cpu = tf.config.list_physical_devices("CPU")[0]
        count = int(argv[1])
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * count
        )
        argv = argv[2:]
    if argv[:1] == ["--record-shards"]:
        record(argv[1])
        argv = argv[2:]
    if argv[:1] == ["--fail-in-validation"]:
        fail_in_validation()
        argv = argv[1:]
    from cnnmnist.cli import cli

    cli(argv, prog_name="cnnmnist")


def fail_in_validation() -> None:
    """Make this process fail as a TensorFlow op would, in its first validation pass."""
    import tensorflow as tf

    from cnnmnist.training import loop

    def failing(self, images, labels):
        raise tf.errors.InvalidArgumentError(None, None, "injected fault in validation")

    loop.Evaluation.__call__ = failing


def record(path: str) -> None:
    """Wrap the sharding function so that the rows it gives each epoch are saved."""
    import tensorflow as tf

    from cnnmnist.training import pipeline

    epochs: list[np.ndarray] = []
    shard_rows = pipeline.replica_rows

    def recording(order, steps, global_batch, shard, pad=False):
        rows = shard_rows(order, steps, global_batch, shard, pad)
        if pad:  # evaluation, not training
            return rows

        def keep(value):
            epochs.append(value.numpy())
            return value

        recorded = tf.py_function(keep, [rows], tf.int64)
        recorded.set_shape(rows.shape)
        return recorded

    pipeline.replica_rows = recording
    atexit.register(lambda: np.save(path, np.stack(epochs)))


if __name__ == "__main__":
    main(sys.argv[1:])
