"""cnnmnist: train, check and use a convolutional digit classifier from the command line."""

import os

__version__ = "0.2.0"

# TensorFlow's C++ start-up chatter (oneDNN, CUDA stubs) is not for our users; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# This tool is TensorFlow-only (tf.data, tf.distribute, SavedModel): a Keras user whose
# KERAS_BACKEND or ~/.keras/keras.json names JAX or PyTorch still gets TensorFlow here.
os.environ["KERAS_BACKEND"] = "tensorflow"
