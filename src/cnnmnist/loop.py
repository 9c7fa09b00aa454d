"""The training loop: one loop of our own, run under whichever tf.distribute strategy is chosen.

Keras's `model.fit` fails under MultiWorkerMirroredStrategy in Keras 3.15 / TF 2.21
(keras-team/keras#20585), so training follows TensorFlow's custom-training pattern: a
tf.function that calls `strategy.run` on each replica's batch. A single-device run is the
same loop under the default strategy, so progress, metrics, checkpoints and resume behave
the same everywhere. Keras callbacks (progress, safekeeping, TensorBoard) are driven by it.

The data: the shuffled order of epoch e is a function of (seed, e) only; global step s covers
order[s*G : (s+1)*G] for global batch G, and replica r of R takes the r-th slice of G/R of it,
so every worker reads a disjoint shard and the images of a step do not depend on how many
replicas share it. An epoch is floor(n / G) full steps (the few images left over are
different ones every epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    import tensorflow as tf

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
    import tensorflow as tf

    def gather(rows):
        return tf.cast(tf.gather(x, rows), tf.float32), tf.gather(y, rows)

    return gather


def _gather_weighted(x, y):
    """Indices -> (float32 pixels, int32 labels, float32 weights): -1 marks padding, which
    reads image 0 and weighs 0. Every replica's batch keeps its full size: an empty or short
    batch on one replica is what broke evaluation over two replicas (oneDNN's pooling returns
    a wrongly shaped result for an empty batch, and the next convolution fails)."""
    import tensorflow as tf

    def gather(rows):
        real = rows >= 0
        pixels, labels = _gather(x, y)(tf.where(real, rows, tf.zeros_like(rows)))
        return pixels, labels, tf.cast(real, tf.float32)

    return gather


def _prefetched(ds):
    """Two batches ahead, without tf.data's autotuning.

    With autotuning, destroying a finished iterator took 8.6-9.5 s in 4 of 6 runs here (the
    "fit() takes seconds to return" oddity, in our loop too); without, 0 s in 5 of 5.
    Gathering a batch is cheap, so fixed small parallelism loses nothing.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.prefetch(2).with_options(options)


def _tensors(images: np.ndarray, labels: np.ndarray):
    import tensorflow as tf

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
    import tensorflow as tf

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
    import tensorflow as tf

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


def _totals(per_example, logits, labels, weights=None):
    """[sum of losses, correct predictions, examples] of one replica's batch, each example
    counted with its weight (1 unless given)."""
    import tensorflow as tf

    correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), labels), tf.float32)
    if weights is None:
        weights = tf.ones_like(correct)
    per_example = tf.cast(per_example, tf.float32)
    return tf.stack(
        [
            tf.reduce_sum(per_example * weights),
            tf.reduce_sum(correct * weights),
            tf.reduce_sum(weights),
        ]
    )


def smoothed(cross_entropy, logits, smoothing: float):
    """Cross-entropy against the target (1 - e) * one-hot + e / K, from the plain one:
    (1 - e) * CE + e * mean over the K classes of -log p."""
    import tensorflow as tf

    if not smoothing:
        return cross_entropy
    uniform = -tf.reduce_mean(tf.nn.log_softmax(logits), axis=-1)
    return (1 - smoothing) * cross_entropy + smoothing * uniform


class Evaluation:
    """(mean cross-entropy, accuracy) of a model on labelled images, under a strategy."""

    def __init__(self, net, strategy) -> None:
        import tensorflow as tf

        self.net, self.strategy = net, strategy
        self._run = tf.function(self._run_all)  # traced once, reused every epoch

    def _step(self, batch):
        import keras

        x, y, weights = batch
        logits = self.net(x, training=False)
        per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return _totals(per_example, logits, y, weights)

    def _run_all(self, iterator):
        import tensorflow as tf

        total = tf.zeros([3])
        for batch in iterator:
            per_replica = self.strategy.run(self._step, args=(batch,))
            total += self.strategy.reduce("SUM", per_replica, axis=None)
        return total

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        """Every image once, split over the replicas."""
        batches = self.strategy.distribute_datasets_from_function(
            lambda context: evaluation_batches(images, labels, Shard.of(context))
        )
        loss, correct, count = self._run(iter(batches)).numpy().tolist()
        return loss / count, correct / count


class Loop:
    """Trains a compiled Keras model under a strategy, `chunk` steps per tf.function call."""

    def __init__(
        self, net, strategy, global_batch: int, chunk: int, label_smoothing: float = 0.0
    ) -> None:
        import tensorflow as tf

        self.net, self.strategy, self.global_batch, self.chunk = net, strategy, global_batch, chunk
        self.label_smoothing = label_smoothing
        with strategy.scope():
            net.optimizer.build(net.trainable_variables)  # slots exist before the first step
        step = self._step
        if net.jit_compile:  # Keras decided (XLA on GPUs, never on CPUs), as model.fit would
            step = tf.function(step, jit_compile=True, reduce_retracing=True)
        self._replica_step = step
        self._chunk = tf.function(self._run_chunk)
        self.evaluate = Evaluation(net, strategy)

    def _step(self, batch):
        import keras
        import tensorflow as tf

        x, y = batch
        net = self.net
        with tf.GradientTape() as tape:
            logits = net(x, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            objective = smoothed(per_example, logits, self.label_smoothing)
            # Sum over this replica / global batch: the optimizer sums the replicas' gradients.
            loss = tf.reduce_sum(objective) / self.global_batch
            if net.losses:
                loss += tf.add_n(net.losses) / self.strategy.num_replicas_in_sync
            scaled = net.optimizer.scale_loss(loss)  # float16 loss scaling; identity otherwise
        gradients = tape.gradient(scaled, net.trainable_variables)
        net.optimizer.apply(gradients, net.trainable_variables)
        return _totals(per_example, logits, y)

    def _run_chunk(self, iterator, steps):
        import tensorflow as tf

        total = tf.zeros([3])
        for _ in tf.range(steps):
            per_replica = self.strategy.run(self._replica_step, args=(next(iterator),))
            total += self.strategy.reduce("SUM", per_replica, axis=None)
        return total

    def fit(
        self,
        batches,
        epochs: range,
        steps: int,
        callbacks,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Train epochs `epochs` on `batches` (a dataset function), reporting to `callbacks`
        (a keras.callbacks.CallbackList); once a callback sets `net.stop_training`, the epoch
        ends at the next chunk boundary and training stops."""
        import tensorflow as tf

        net = self.net
        iterator = iter(self.strategy.distribute_datasets_from_function(batches))
        net.stop_training = False
        callbacks.on_train_begin()
        for epoch in epochs:
            callbacks.on_epoch_begin(epoch)
            total = np.zeros(3)
            done = 0
            while done < steps and not net.stop_training:
                chunk = min(self.chunk, steps - done)
                # A tensor, not an int: a shorter last chunk must not trace the loop again.
                total += self._chunk(iterator, tf.constant(chunk)).numpy()
                done += chunk
                callbacks.on_train_batch_end(done - 1, _logs(total))
            logs = _logs(total)  # a cut-short epoch is still reported, as model.fit does
            if validation is not None and not net.stop_training:
                val_loss, val_accuracy = self.evaluate(*validation)
                logs |= {"val_loss": val_loss, "val_accuracy": val_accuracy}
            callbacks.on_epoch_end(epoch, logs)
            if net.stop_training:
                break
        callbacks.on_train_end()


def _logs(total: np.ndarray) -> dict[str, Any]:
    loss, correct, count = total.tolist()
    return {"loss": loss / max(count, 1), "accuracy": correct / max(count, 1)}
