"""The script a user would write instead of cnnmnist: the book's model in plain Keras, one
epoch of `model.fit`, the test evaluation, and a save. wallclock.py times it, whole process,
as the baseline for `cnnmnist train --preset fast`.

    python benchmarks/plain_keras.py MNIST_DIR OUT.keras [TRAINING_IMAGES]
"""

import gzip
import sys
from pathlib import Path

import keras
import numpy as np
from keras import layers


def idx(path: Path, offset: int) -> np.ndarray:
    return np.frombuffer(gzip.open(path).read(), np.uint8, offset=offset)


root = Path(sys.argv[1])
x = idx(root / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1) / 255.0
y = idx(root / "train-labels-idx1-ubyte.gz", 8)
x_test = idx(root / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1) / 255.0
y_test = idx(root / "t10k-labels-idx1-ubyte.gz", 8)

model = keras.Sequential(
    [
        keras.Input((28, 28, 1)),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(2, padding="same"),
        layers.Conv2D(64, 3, padding="same", activation="relu"),
        layers.MaxPooling2D(2, padding="same"),
        layers.Flatten(),
        layers.Dense(256, activation="relu"),
        layers.Dropout(0.3),
        layers.Dense(10),
    ]
)
model.compile(
    optimizer=keras.optimizers.Adam(1e-3),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    metrics=["accuracy"],
)
end = 5000 + int(sys.argv[3]) if len(sys.argv) > 3 else None  # a smoke test's few images
model.fit(x[5000:end], y[5000:end], batch_size=100, epochs=1, verbose=2)
loss, accuracy = model.evaluate(x_test, y_test, batch_size=1000, verbose=0)
model.save(sys.argv[2])
print(f'{{"test_accuracy": {accuracy}}}')
