"""Shared fixtures: the real MNIST (never skipped) and one briefly trained checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _mnist_dir() -> Path:
    configured = os.environ.get("CNNMNIST_DATA_DIR")
    return Path(configured) if configured else REPO.parent / "shared" / "data" / "mnist"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST; a missing copy fails the run rather than skipping the real-data tests."""
    path = _mnist_dir()
    if (
        not (path / "t10k-labels-idx1-ubyte.gz").exists()
        and not (path / "t10k-labels-idx1-ubyte").exists()
    ):
        pytest.fail(f"real MNIST not found in {path}; set CNNMNIST_DATA_DIR", pytrace=False)
    return path


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    """Fashion-MNIST from Debian's dataset-fashion-mnist (.ci/run installs it); never skipped."""
    from cnnmnist import data

    path = Path(data.SPECS["fashion-mnist"].system_dirs[0])
    if not (path / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST not found in {path}: apt-get install dataset-fashion-mnist")
    return path


@pytest.fixture(scope="session")
def mnist(mnist_dir):
    from cnnmnist import data

    return data.load("mnist", mnist_dir, allow_download=False)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, mnist_dir):
    """One epoch of the reference `seed` preset on the real MNIST (about 25 s here)."""
    from cnnmnist import presets, train

    out = tmp_path_factory.mktemp("trained") / "ckpt"
    return train.run(
        presets.get("seed").with_overrides(epochs=1), train.Options(data_dir=mnist_dir, out=out)
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
    """The weights of a checkpoint's model.keras, loaded as a user would (cnnmnist.model.load)."""
    from cnnmnist import checkpoint, model

    return model.load(ckpt / checkpoint.KERAS_MODEL).get_weights()
