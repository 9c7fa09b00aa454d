"""Setting up TensorFlow for a run: which device, which precision (Keras dtype policy), and
Keras's global settings, whatever the user's keras.json says."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras
import tensorflow as tf

from cnnmnist.errors import CnnmnistError
from cnnmnist.hardware import cpu_flags, onednn_cap, resolve_precision


def configure_device(device: str) -> None:
    """Choose CPU or GPU before TensorFlow touches a device; GPUs grow their memory as needed."""
    gpus = tf.config.list_physical_devices("GPU")
    if device == "gpu" and not gpus:
        raise CnnmnistError(
            "--device gpu: TensorFlow sees no GPU on this machine (use --device cpu)"
        )
    if device == "cpu":
        tf.config.set_visible_devices([], "GPU")
        return
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)


def precision_policy(choice: str) -> str:
    """The dtype policy for --precision on this machine (TensorFlow's devices are set up)."""
    has_gpu = bool(tf.config.list_logical_devices("GPU"))
    return resolve_precision(choice, cpu_flags(), has_gpu, onednn_cap())


# Keras's global settings the recipes were measured with. A user's ~/.keras/keras.json may
# set others: floatx "float16" makes every variable float16 (the learning rate too), and the
# run's metadata would not say so.
KERAS_SETTINGS = {"floatx": "float32", "epsilon": 1e-7, "image_data_format": "channels_last"}


@contextlib.contextmanager
def global_policy(name: str) -> Iterator[None]:
    """Keras's dtype policy and settings are globals: set them for the run (the policy
    `name`, KERAS_SETTINGS), then leave them as found."""
    config = keras.config
    previous = (
        keras.mixed_precision.global_policy(),
        {key: getattr(config, key)() for key in KERAS_SETTINGS},
    )
    for key, value in KERAS_SETTINGS.items():
        getattr(config, f"set_{key}")(value)
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous[0])
        for key, value in previous[1].items():
            getattr(config, f"set_{key}")(value)
