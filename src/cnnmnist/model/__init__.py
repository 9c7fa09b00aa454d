"""The model side: cnnmnist's Keras layers and optimizers (registered with Keras) and the
architectures (a registry). It knows nothing of training or presets. Importing it is all
that `keras.saving.load_model` needs to read a checkpoint's model.keras."""

from cnnmnist.model import layers, optimizers  # noqa: F401 - registers the Keras classes
from cnnmnist.model.architectures import (
    ARCHITECTURES,
    INPUT_SHAPE,
    NUM_CLASSES,
    build,
    without_augmentation,
)

__all__ = ["ARCHITECTURES", "INPUT_SHAPE", "NUM_CLASSES", "build", "without_augmentation"]
