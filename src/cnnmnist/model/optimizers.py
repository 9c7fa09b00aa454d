"""The optimizers, by the names presets and --optimizer use; `build` is the only way in.
TF1RMSprop is registered with Keras, so a model.keras trained with it reloads."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

from cnnmnist.errors import UsageError
from cnnmnist.model.layers import PACKAGE


@keras.saving.register_keras_serializable(package=PACKAGE)
class TF1RMSprop(keras.optimizers.RMSprop):
    """RMSProp as TF1's tf.train.RMSPropOptimizer had it: the mean square starts at ones
    (Keras: zeros) and epsilon is 1e-10 (Keras: 1e-7)."""

    def __init__(self, learning_rate=0.001, rho=0.9, epsilon=1e-10, **kwargs):
        super().__init__(learning_rate=learning_rate, rho=rho, epsilon=epsilon, **kwargs)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        for velocity in self._velocities:
            velocity.assign(keras.ops.ones_like(velocity))


def _keras(class_name: str, **settings: Any) -> Callable:
    return lambda learning_rate: getattr(keras.optimizers, class_name)(
        learning_rate=learning_rate, **settings
    )


# Name -> a function of the learning rate (a number or a schedule).
OPTIMIZERS: dict[str, Callable] = {
    "adam": _keras("Adam"),
    "adamw": _keras("AdamW"),
    "nadam": _keras("Nadam"),
    "adamax": _keras("Adamax"),
    "rmsprop": _keras("RMSprop", rho=0.9),  # the chapter's decay 0.9
    "rmsprop-tf1": lambda learning_rate: TF1RMSprop(learning_rate=learning_rate),
    "sgd": _keras("SGD"),
    "adagrad": _keras("Adagrad"),
    "adadelta": _keras("Adadelta"),
    "lion": _keras("Lion"),
}


def build(name: str, learning_rate) -> keras.optimizers.Optimizer:
    """The optimizer registered as `name`, at `learning_rate` (a number or a schedule)."""
    try:
        make = OPTIMIZERS[name]
    except KeyError:
        raise UsageError(
            f"unknown optimizer {name!r} (choose from: {', '.join(OPTIMIZERS)})"
        ) from None
    return make(learning_rate)
