"""Shared fixtures: the real MNIST and Fashion-MNIST, found as the tool finds them (never
skipped), and one briefly trained checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest


def found(name: str) -> Path | str:
    """Where a dataset is, found as `cnnmnist` finds it ($CNNMNIST_DATA_DIR, the system's
    folders, Keras's mnist.npz, the user cache), downloaded into the cache first when it is
    missing and the machine is online; or, when it cannot be had, the line that says so."""
    from cnnmnist import data
    from cnnmnist.errors import DataError

    place = data.locate(name)
    if place is None:
        try:
            data.load(name)
        except DataError as e:
            return f"{name} is needed for the tests and is not here: {str(e).splitlines()[0]}"
        place = data.locate(name)
    return place[0]


@pytest.fixture(scope="session", autouse=True)
def _real_mnist():
    """The real MNIST, found before any test and named in $CNNMNIST_DATA_DIR for every
    `cnnmnist` the tests start (each test gets an empty cache of its own)."""
    where = found("mnist")
    with pytest.MonkeyPatch.context() as patch:
        if isinstance(where, Path):
            patch.setenv("CNNMNIST_DATA_DIR", str(where))
        yield where


@pytest.fixture(scope="session")
def mnist_dir(_real_mnist) -> Path:
    """The real MNIST; when it cannot be had, the tests that need it fail with one line (they
    never skip)."""
    if not isinstance(_real_mnist, Path):
        pytest.fail(_real_mnist, pytrace=False)
    return _real_mnist


@pytest.fixture(scope="session")
def fashion_mnist_dir(mnist_dir) -> Path:
    """Fashion-MNIST, found or downloaded as MNIST is (Debian's dataset-fashion-mnist package
    puts it where it is found offline)."""
    where = found("fashion-mnist")
    if not isinstance(where, Path):
        pytest.fail(where, pytrace=False)
    return where


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from cnnmnist import data

    return data.load("mnist", mnist_dir, allow_download=False)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mnist_dir):
    """One epoch of the reference `seed` preset on the real MNIST (about 25 s here)."""
    from cnnmnist import presets, training

    out = tmp_path_factory.mktemp("trained") / "ckpt"
    return training.run(
        presets.get("seed").with_overrides(epochs=1), training.Options(data_dir=mnist_dir, out=out)
    )


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test reads or writes the user's real cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # nor Keras's own downloads


def without_package(monkeypatch, package: str) -> None:
    """Make importlib say `package` is not installed (as for a user without an extra)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )


def saved_weights(ckpt: Path) -> list:
    """The weights of a checkpoint's model.keras, loaded as a user would: importing
    cnnmnist.model registers its Keras classes, then keras.saving.load_model reads it."""
    import keras

    import cnnmnist.model  # noqa: F401 - registers the Keras classes model.keras names
    from cnnmnist import checkpoint

    return keras.saving.load_model(ckpt / checkpoint.KERAS_MODEL).get_weights()
