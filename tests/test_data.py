"""IDX/npz parsing, validation, checksums and the offline error, on small synthetic files."""

import dataclasses
import gzip
import shutil
import struct

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from cnnmnist import data
from cnnmnist.cli import cli
from cnnmnist.errors import DataError


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.asarray(array, dtype=np.uint8)
    return (
        struct.pack(">HBB", 0, 8, array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def write_dataset(directory, n_train=12, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for role, stem in data.STEMS.items():
        raw = idx_bytes(arrays[role])
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / stem).write_bytes(raw)
    return arrays


def test_parse_idx_round_trip():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    parsed = data.parse_idx(idx_bytes(images), "x", 3)
    assert parsed.dtype == np.uint8 and np.array_equal(parsed, images)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x00\x00\x09\x03" + b[4:], "bad magic number"),
        (lambda b: b"\x12\x34" + b[2:], "bad magic number"),
        (lambda b: b[:-1], "truncated or corrupted"),
        (lambda b: b + b"\x00", "truncated or corrupted"),
        (lambda b: b[:10], "truncated"),
        (lambda b: b[:3], "too short"),
        (lambda b: b"\x00\x00\x08\x01" + b[4:], "has 1 dimensions, expected 3"),
    ],
)
def test_parse_idx_rejects_corruption_with_a_clear_message(mutate, message):
    good = idx_bytes(np.zeros((3, 28, 28)))
    with pytest.raises(DataError, match=message):
        data.parse_idx(mutate(good), "images.idx", 3)


def test_parse_idx_rejects_wrong_image_size():
    with pytest.raises(DataError, match="expected 28x28"):
        data.parse_idx(idx_bytes(np.zeros((2, 32, 32))), "x", 3)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from([1, 3]))
def test_parse_idx_never_raises_anything_but_data_error(blob, ndim):
    try:
        array = data.parse_idx(blob, "fuzz", ndim)
    except DataError:
        return
    assert array.dtype == np.uint8 and array.ndim == ndim


@pytest.mark.parametrize("gz", [True, False])
def test_reads_gzip_and_raw_idx_and_reports_checksum_mismatch(tmp_path, gz):
    write_dataset(tmp_path, gz=gz)
    with pytest.raises(DataError, match="checksum mismatch") as info:
        data.load("mnist", tmp_path, allow_download=False)
    assert "train-images-idx3-ubyte" in str(info.value)
    directory, checks = data.check("mnist", tmp_path)
    assert directory == tmp_path
    assert [c.shape for c in checks] == [(12, 28, 28), (12,), (5, 28, 28), (5,)]
    assert all(c.error == "checksum mismatch" for c in checks)


def test_real_mnist_loads_and_verifies(mnist):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.train_images.dtype == np.uint8
    assert mnist.test_images.shape == (10000, 28, 28)
    assert set(np.unique(mnist.test_labels)) == set(range(10))
    assert mnist.checksums == data.SPECS["mnist"].md5
    train_x, train_y = mnist.split("train", 5000)
    val_x, _ = mnist.split("validation", 5000)
    assert len(train_x) == len(train_y) == 55000 and len(val_x) == 5000
    assert np.array_equal(val_x[0], mnist.train_images[0])  # the first 5,000 are held out


def test_keras_npz_is_accepted_and_verified(tmp_path, mnist):
    np.savez(
        tmp_path / "mnist.npz",
        x_train=mnist.train_images,
        y_train=mnist.train_labels,
        x_test=mnist.test_images,
        y_test=mnist.test_labels,
    )
    loaded = data.load("mnist", tmp_path, allow_download=False)
    assert loaded.checksums == data.SPECS["mnist"].md5
    assert np.array_equal(loaded.test_images, mnist.test_images)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    objects = np.array([{"evil": 1}] * 3, dtype=object)
    np.savez(
        tmp_path / "mnist.npz", x_train=objects, y_train=objects, x_test=objects, y_test=objects
    )
    with pytest.raises(DataError, match="pickled"):
        data.load("mnist", tmp_path, allow_download=False)


def test_partial_directory_names_the_missing_files(tmp_path, mnist_dir):
    for f in mnist_dir.iterdir():
        if f.name.startswith("train"):
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(DataError, match="missing t10k-images-idx3-ubyte") as info:
        data.load("mnist", tmp_path, allow_download=False)
    assert str(tmp_path) in str(info.value)


def test_label_count_mismatch_names_the_file(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(4))))
    with pytest.raises(DataError, match="4 labels, but .* has 5 images"):
        data.load("mnist", tmp_path, allow_download=False)


def test_corrupt_gzip_is_a_data_error(tmp_path):
    write_dataset(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz"):
        data.load("mnist", tmp_path, allow_download=False)


def test_search_order_flag_env_system_keras_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNMNIST_DATA_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    cache = tmp_path / "xdg" / "cnnmnist" / "mnist"
    keras = tmp_path / "keras" / "datasets"
    assert data.candidate_dirs("mnist", tmp_path / "flag") == [
        tmp_path / "flag",
        tmp_path / "env",
        keras,
        cache,
    ]
    assert data.download_dir("mnist", None) == tmp_path / "env"
    monkeypatch.delenv("CNNMNIST_DATA_DIR")
    assert data.candidate_dirs("mnist", None) == [keras, cache]
    assert data.download_dir("mnist", None) == cache  # never into Keras's directory
    fashion = data.candidate_dirs("fashion-mnist", None)
    assert fashion == [
        data.Path(data.SPECS["fashion-mnist"].system_dirs[0]),
        tmp_path / "xdg" / "cnnmnist" / "fashion-mnist",
    ]
    assert data.download_dir("fashion-mnist", None) == fashion[1]  # never into /usr/share


def test_a_keras_users_mnist_npz_is_found_verified_and_used(tmp_path, monkeypatch, mnist):
    monkeypatch.delenv("CNNMNIST_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    (tmp_path / "keras" / "datasets").mkdir(parents=True)
    # The file keras.datasets.mnist.load_data() writes: the four arrays under these keys.
    np.savez_compressed(
        tmp_path / "keras" / "datasets" / "mnist.npz",
        x_train=mnist.train_images,
        y_train=mnist.train_labels,
        x_test=mnist.test_images,
        y_test=mnist.test_labels,
    )
    found = data.load("mnist", allow_download=False)
    assert found.source == tmp_path / "keras" / "datasets"
    assert found.checksums == mnist.checksums  # verified against the canonical MD5s


def test_a_directory_holding_another_dataset_is_passed_over(tmp_path, monkeypatch, mnist_dir):
    monkeypatch.setenv("CNNMNIST_DATA_DIR", str(mnist_dir))  # MNIST, while fashion is asked for
    no_system = dataclasses.replace(data.SPECS["fashion-mnist"], system_dirs=())
    monkeypatch.setitem(data.SPECS, "fashion-mnist", no_system)
    assert data.locate("fashion-mnist") is None
    assert data.locate("mnist")[0] == mnist_dir


def test_offline_and_missing_exits_1_naming_files_and_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("CNNMNIST_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # Port 9 on loopback refuses at once: the real download code runs and fails like offline.
    dead = data.DatasetSpec("mnist", data.SPECS["mnist"].md5, mirrors=("http://127.0.0.1:9/",))
    monkeypatch.setitem(data.SPECS, "mnist", dead)
    result = CliRunner().invoke(cli, ["train", "--epochs", "1", "--out", str(tmp_path / "ck")])
    assert result.exit_code == 1, result.output
    assert "could not be downloaded" in result.output
    assert str(tmp_path / "cnnmnist" / "mnist") in result.output
    for stem in data.STEMS.values():
        assert stem in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "ck").exists()


def test_data_command_reports_real_mnist(mnist_dir):
    result = CliRunner().invoke(cli, ["data", "--data-dir", str(mnist_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert '"ok": true' in result.output


def test_data_command_exits_1_on_mismatch(tmp_path):
    write_dataset(tmp_path)
    result = CliRunner().invoke(cli, ["data", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "4 of 4 files failed verification" in result.output


def test_fashion_mnist_from_the_debian_package(fashion_mnist_dir):
    directory = str(fashion_mnist_dir)
    ds = data.load(
        "fashion-mnist", allow_download=False
    )  # found although $CNNMNIST_DATA_DIR is MNIST
    assert ds.source == data.Path(directory)
    assert ds.test_images.shape == (10000, 28, 28)
