"""The input pipeline: MNIST arrays in memory -> tf.data batches for each replica.

The shuffled order of epoch e is a function of (seed, e) only; global step s covers
order[s*G : (s+1)*G] for global batch G, and replica r of R takes the r-th slice of G/R of
it, so every worker reads a disjoint shard and the images of a step do not depend on how many
replicas share it. An epoch is floor(n / G) full steps (the few images left over are
different ones every epoch). Evaluation sees every image once, in full-size weighted batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from cnnmnist.errors import UsageError

EVAL_BATCH = 1000  # per replica; evaluation has no gradients, so a large batch is cheap


@dataclass(frozen=True)
class Shard:
    """Which replicas' batches this input pipeline makes: `local` of them from `first` on,
    out of `replicas` in all."""

    replicas: int = 1
    first: int = 0
    local: int = 1

    @classmethod
    def of(cls, context) -> Shard:
        """The shard of a tf.distribute.InputContext (one input pipeline per worker)."""
        local = context.num_replicas_in_sync // context.num_input_pipelines
        return cls(context.num_replicas_in_sync, context.input_pipeline_id * local, local)


def replica_rows(order, steps: int, global_batch: int, shard: Shard, pad: bool = False):
    """This pipeline's batches of indices: [steps * shard.local, global_batch / replicas].

    Row k*local + j is replica (first + j)'s part of step k. With `pad`, the order is filled
    up to whole steps with -1 (padding that evaluation weighs 0: it sees every image once);
    without, it is cut to whole steps (training: full batches only).
    """
    per_replica = global_batch // shard.replicas
    order = tf.cast(order, tf.int64)
    needed = steps * global_batch
    if pad:
        order = tf.concat([order, -tf.ones([needed - tf.size(order)], tf.int64)], 0)
    rows = tf.reshape(order[:needed], [steps, shard.replicas, per_replica])
    rows = rows[:, shard.first : shard.first + shard.local]
    return tf.reshape(rows, [-1, per_replica])


def _gather(x, y):
    """Indices -> (float32 pixels, int32 labels)."""

    def gather(rows):
        return tf.cast(tf.gather(x, rows), tf.float32), tf.gather(y, rows)

    return gather


def _gather_weighted(x, y):
    """Indices -> (float32 pixels, int32 labels, float32 weights): -1 marks padding, which
    reads image 0 and weighs 0. Every replica's batch keeps its full size: an empty or short
    batch on one replica is what broke evaluation over two replicas (oneDNN's pooling returns
    a wrongly shaped result for an empty batch, and the next convolution fails)."""

    def gather(rows):
        real = rows >= 0
        pixels, labels = _gather(x, y)(tf.where(real, rows, tf.zeros_like(rows)))
        return pixels, labels, tf.cast(real, tf.float32)

    return gather


def _prefetched(ds):
    """Two batches ahead, without tf.data's autotuning.

    With autotuning, destroying a finished iterator often stalled for seconds here (the
    "fit() takes seconds to return" oddity; docs/results.md, Speed); without, it does not.
    Gathering a batch is cheap, so fixed small parallelism loses nothing.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(2).with_options(options)


def _tensors(images: np.ndarray, labels: np.ndarray):
    return tf.constant(images.reshape(-1, 28, 28, 1)), tf.constant(labels.astype(np.int32))


def training_batches(
    images: np.ndarray,
    labels: np.ndarray,
    global_batch: int,
    seed: int,
    epochs: range,
    shard: Shard = Shard(),
):
    """tf.data per-replica batches for epochs `epochs`, uint8 in memory, cast per batch."""
    x, y = _tensors(images, labels)
    n = len(images)
    steps = steps_per_epoch(n, global_batch, shard.replicas)

    def epoch_rows(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), epoch])
        )
        return tf.data.Dataset.from_tensor_slices(replica_rows(order, steps, global_batch, shard))

    ds = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch_rows)
    return _prefetched(ds.map(_gather(x, y), num_parallel_calls=2, deterministic=True))


def evaluation_batches(
    images: np.ndarray, labels: np.ndarray, shard: Shard = Shard(), batch: int = EVAL_BATCH
):
    """Every image once, in order, split over the replicas as weighted batches of `batch`
    (at most the number of images): the padding that fills the last step weighs 0."""
    x, y = _tensors(images, labels)
    batch = max(1, min(batch, math.ceil(len(images) / shard.replicas)))
    global_batch = batch * shard.replicas
    steps = max(1, math.ceil(len(images) / global_batch))
    rows = replica_rows(tf.range(len(images)), steps, global_batch, shard, pad=True)
    return _prefetched(tf.data.Dataset.from_tensor_slices(rows).map(_gather_weighted(x, y)))


def steps_per_epoch(n: int, global_batch: int, replicas: int) -> int:
    """Full global batches in an epoch; the batch must split evenly over the replicas."""
    if global_batch % replicas:
        raise UsageError(
            f"--batch-size {global_batch} does not split evenly over {replicas} replicas "
            "(it is the global batch); choose a multiple of the replica count"
        )
    if n < global_batch:
        raise UsageError(f"--batch-size {global_batch} is larger than the {n} training images")
    return n // global_batch
