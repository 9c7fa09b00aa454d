"""The training loop: one loop of our own, run under whichever tf.distribute strategy is chosen.

Keras's `model.fit` fails under MultiWorkerMirroredStrategy in Keras 3.15 / TF 2.21
(keras-team/keras#20585), so training follows TensorFlow's custom-training pattern: a
tf.function that calls `strategy.run` on each replica's batch, CHUNK steps per call. A
single-device run is the same loop under the default strategy, so progress, metrics,
checkpoints and resume behave the same everywhere. Keras callbacks (progress, safekeeping,
TensorBoard) are driven by it. Its batches come from `pipeline`.
"""

from __future__ import annotations

import functools
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from cnnmnist.training import pipeline

# Training steps per tf.function call (Keras calls it steps_per_execution): fewer Python
# round trips than one step per call, while Ctrl-C, the divergence check and the progress
# bar still react within about a second.
CHUNK = 50


def _totals(per_example, logits, labels, weights=None):
    """[sum of losses, correct predictions, examples] of one replica's batch, each example
    counted with its weight (1 unless given)."""
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
    if not smoothing:
        return cross_entropy
    uniform = -tf.reduce_mean(tf.nn.log_softmax(logits), axis=-1)
    return (1 - smoothing) * cross_entropy + smoothing * uniform


class Evaluation:
    """(mean cross-entropy, accuracy) of a model on labelled images, under a strategy."""

    def __init__(self, net, strategy) -> None:
        self.net, self.strategy = net, strategy
        self._run = tf.function(self._run_all)  # traced once, reused every epoch

    def _step(self, batch):
        x, y, weights = batch
        logits = self.net(x, training=False)
        per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return _totals(per_example, logits, y, weights)

    def _run_all(self, iterator):
        total = tf.zeros([3])
        for batch in iterator:
            per_replica = self.strategy.run(self._step, args=(batch,))
            total += self.strategy.reduce("SUM", per_replica, axis=None)
        return total

    def __call__(self, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
        """Every image once, split over the replicas."""
        batches = self.strategy.distribute_datasets_from_function(
            lambda context: pipeline.evaluation_batches(images, labels, pipeline.Shard.of(context))
        )
        loss, correct, count = self._run(iter(batches)).numpy().tolist()
        return loss / count, correct / count


class Loop:
    """Trains a compiled Keras model under a strategy, `chunk` steps per tf.function call.
    `clean`: (the same layers without the augmentation, `model.without_augmentation`; the
    epoch from which training goes through them), or None."""

    def __init__(
        self,
        net,
        strategy,
        global_batch: int,
        chunk: int = CHUNK,
        label_smoothing: float = 0.0,
        clean: tuple[Any, int] | None = None,
    ) -> None:
        self.net, self.strategy, self.global_batch, self.chunk = net, strategy, global_batch, chunk
        self.label_smoothing = label_smoothing
        with strategy.scope():
            net.optimizer.build(net.trainable_variables)  # slots exist before the first step
        self._chunk = self._compiled(net)
        self._clean_chunk = self._compiled(clean[0]) if clean is not None else None
        self.clean_from = clean[1] if clean is not None else None
        self.evaluate = Evaluation(net, strategy)

    def _compiled(self, forward):
        """CHUNK steps of training through `forward` (the model or its clean twin), one
        tf.function call."""
        step = functools.partial(self._step, forward)
        if self.net.jit_compile:  # Keras decided (XLA on GPUs, never on CPUs), as fit would
            step = tf.function(step, jit_compile=True, reduce_retracing=True)
        return tf.function(functools.partial(self._run_chunk, step))

    def _step(self, forward, batch):
        x, y = batch
        net = self.net
        with tf.GradientTape() as tape:
            logits = forward(x, training=True)
            per_example = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            objective = smoothed(per_example, logits, self.label_smoothing)
            # Sum over this replica / global batch: the optimizer sums the replicas' gradients.
            loss = tf.reduce_sum(objective) / self.global_batch
            if forward.losses:
                loss += tf.add_n(forward.losses) / self.strategy.num_replicas_in_sync
            scaled = net.optimizer.scale_loss(loss)  # float16 loss scaling; identity otherwise
        gradients = tape.gradient(scaled, net.trainable_variables)
        net.optimizer.apply(gradients, net.trainable_variables)
        return _totals(per_example, logits, y)

    def _run_chunk(self, step, iterator, steps):
        total = tf.zeros([3])
        for _ in tf.range(steps):
            per_replica = self.strategy.run(step, args=(next(iterator),))
            total += self.strategy.reduce("SUM", per_replica, axis=None)
        return total

    def fit_arrays(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        seed: int,
        epochs: range,
        callbacks: list | tuple = (),
        validation: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """Train epochs `epochs` on uint8 arrays in the seeded order of each epoch, reporting
        to Keras `callbacks` (and the validation arrays' loss and accuracy after each epoch).
        Once a callback sets `net.stop_training`, the epoch ends at the next chunk boundary
        and training stops."""
        net, strategy = self.net, self.strategy
        steps = pipeline.steps_per_epoch(
            len(images), self.global_batch, strategy.num_replicas_in_sync
        )
        batches = strategy.distribute_datasets_from_function(
            lambda context: pipeline.training_batches(
                images, labels, self.global_batch, seed, epochs, pipeline.Shard.of(context)
            )
        )
        iterator = iter(batches)
        callbacks = keras.callbacks.CallbackList(list(callbacks), model=net)
        net.stop_training = False
        callbacks.on_train_begin()
        for epoch in epochs:
            callbacks.on_epoch_begin(epoch)
            clean = self._clean_chunk is not None and epoch >= self.clean_from
            run = self._clean_chunk if clean else self._chunk
            total = np.zeros(3)
            done = 0
            while done < steps and not net.stop_training:
                chunk = min(self.chunk, steps - done)
                # A tensor, not an int: a shorter last chunk must not trace the loop again.
                total += run(iterator, tf.constant(chunk)).numpy()
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
