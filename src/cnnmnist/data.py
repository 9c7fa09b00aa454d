"""Finding, verifying, downloading and parsing MNIST-format datasets (numpy only)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnmnist import files
from cnnmnist.errors import DataError

# The four files of an MNIST-format dataset, by role.
STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Keras's mnist.npz holds the same four arrays under these keys.
NPZ_KEYS = {
    "train_images": "x_train",
    "train_labels": "y_train",
    "test_images": "x_test",
    "test_labels": "y_test",
}
DIGITS = tuple(str(d) for d in range(10))
MAX_DECOMPRESSED = 256 * 2**20  # far above MNIST's 47 MB: refuse gzip bombs


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset may come from and what its files must contain."""

    name: str
    md5: dict[str, str]  # file stem -> MD5 of the decompressed file (canonical)
    mirrors: tuple[str, ...]  # base URLs serving STEM.gz
    gz_md5: dict[str, str] = field(default_factory=dict)  # what those mirrors serve
    system_dirs: tuple[str, ...] = ()
    classes: tuple[str, ...] = DIGITS


SPECS = {
    "mnist": DatasetSpec(
        name="mnist",
        md5={
            "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
            "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
            "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
            "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
        },
        gz_md5={
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        mirrors=(
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
        ),
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        md5={
            "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
            "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
            "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        gz_md5={
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        mirrors=(
            "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        ),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        classes=(
            "T-shirt/top",
            "Trouser",
            "Pullover",
            "Dress",
            "Coat",
            "Sandal",
            "Shirt",
            "Sneaker",
            "Bag",
            "Ankle boot",
        ),
    ),
}


@dataclass
class Dataset:
    """The four arrays of a dataset (uint8 images N x 28 x 28, uint8 labels) and their origin."""

    name: str
    source: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    checksums: dict[str, str]

    def split(self, which: str, validation_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Images and labels of 'train', 'validation' (first N of the train file) or 'test'."""
        if which == "test":
            return self.test_images, self.test_labels
        if which == "validation":
            if validation_size == 0:
                raise DataError("this run holds out no validation images (validation_size 0)")
            return self.train_images[:validation_size], self.train_labels[:validation_size]
        if which == "train":
            return self.train_images[validation_size:], self.train_labels[validation_size:]
        raise ValueError(f"unknown split {which!r}")


@dataclass
class FileCheck:
    """The result of reading and verifying one dataset file."""

    role: str
    path: Path
    shape: tuple[int, ...] | None = None
    md5: str | None = None
    expected_md5: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.md5 == self.expected_md5


def spec(name: str) -> DatasetSpec:
    """The spec of a dataset by name."""
    try:
        return SPECS[name]
    except KeyError:
        raise DataError(f"unknown dataset {name!r} (choose from: {', '.join(SPECS)})") from None


def cache_dir(name: str) -> Path:
    """The per-user directory that downloads go to."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cnnmnist" / name


def keras_datasets_dir() -> Path:
    """Where `keras.datasets.mnist.load_data()` keeps its mnist.npz: $KERAS_HOME/datasets,
    else ~/.keras/datasets."""
    return Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "datasets"


def candidate_dirs(name: str, data_dir: Path | None) -> list[Path]:
    """Where to look, in order: --data-dir, CNNMNIST_DATA_DIR, system directories, Keras's
    own download of MNIST (mnist.npz), the cache."""
    explicit = [Path(d) for d in (data_dir, os.environ.get("CNNMNIST_DATA_DIR")) if d]
    keras = [keras_datasets_dir()] if name == "mnist" else []
    return explicit + [Path(d) for d in spec(name).system_dirs] + keras + [cache_dir(name)]


def download_dir(name: str, data_dir: Path | None) -> Path:
    """Where a missing dataset is downloaded to: the directory the user named, else the cache
    (never a system directory, nor Keras's). A named path that is a file is refused; a named
    folder that holds another dataset (CNNMNIST_DATA_DIR pointing at MNIST while
    Fashion-MNIST is asked for) is left alone, as their files share names."""
    named = [
        (Path(d), what)
        for d, what in ((data_dir, "--data-dir"), (os.environ.get("CNNMNIST_DATA_DIR"), None))
        if d
    ]
    named = [(d, what) for d, what in named if not _holds_another(d, name)]
    target = named[0][0] if named else cache_dir(name)
    if target.exists() and not target.is_dir():
        what = (named[0][1] or "CNNMNIST_DATA_DIR") if named else "the cache"
        raise DataError(f"{target}: {what} names a file, not a folder to keep {name} in")
    return target


def _holds_another(directory: Path, name: str) -> bool:
    """Whether `directory` holds a known dataset other than `name`."""
    if not directory.is_dir():
        return False
    try:
        found = _sources(directory, name)
    except DataError:
        return False
    return found is not None and _identify(found) not in (None, name)


def _files_in(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _sources(directory: Path, name: str) -> dict[str, Path] | Path | None:
    """The files of the dataset in a directory: role -> IDX path, an npz path, or None.

    A directory holding some but not all of the IDX files is an error naming the missing ones.
    """
    found = {role: _files_in(directory, stem) for role, stem in STEMS.items()}
    present = {role: p for role, p in found.items() if p is not None}
    if len(present) == len(STEMS):
        return present
    if present:
        missing = [STEMS[r] + "[.gz]" for r, p in found.items() if p is None]
        raise DataError(f"{directory}: incomplete {name} dataset, missing {', '.join(missing)}")
    npz = directory / f"{name}.npz"
    return npz if npz.is_file() else None


def locate(name: str, data_dir: Path | None = None) -> tuple[Path, dict[str, Path] | Path] | None:
    """The first directory that holds the dataset, with its files; None if none does.

    A directory that holds another known dataset (CNNMNIST_DATA_DIR pointing at MNIST while
    Fashion-MNIST is asked for) is passed over, not reported as a checksum mismatch.
    """
    for directory in candidate_dirs(name, data_dir):
        found = _sources(directory, name)
        if found is not None and _identify(found) in (None, name):
            return directory, found
    return None


def _identify(found: dict[str, Path] | Path) -> str | None:
    """Which known dataset a set of IDX files is, judged by its small test-label file."""
    if not isinstance(found, dict):
        return None  # an npz is named after its dataset
    try:
        _, md5 = read_idx(found["test_labels"], 1)
    except DataError:
        return None  # let the full verification report it
    stem = STEMS["test_labels"]
    return next((n for n, s in SPECS.items() if s.md5[stem] == md5), None)


def download(name: str, target: Path) -> dict[str, Path]:
    """Fetch the four .gz files into target with keras.utils.get_file (hash-checked)."""
    dataset = spec(name)
    created = files.make_dirs(target)
    try:
        return _download_into(dataset, target)
    except BaseException:
        files.remove_empty(created)  # a failed download leaves no empty folders behind
        raise


def _download_into(dataset: DatasetSpec, target: Path) -> dict[str, Path]:
    import keras  # only downloads need Keras

    name = dataset.name
    paths: dict[str, Path] = {}
    for role, stem in STEMS.items():
        errors = []
        for mirror in dataset.mirrors:
            try:
                # Keras reports downloads on stdout, which belongs to results (--json): divert it.
                with contextlib.redirect_stdout(sys.stderr):
                    path = keras.utils.get_file(
                        fname=f"{stem}.gz",
                        origin=f"{mirror}{stem}.gz",
                        file_hash=dataset.gz_md5.get(stem),
                        hash_algorithm="md5",
                        cache_dir=str(target),
                        cache_subdir=".",
                    )
                paths[role] = Path(path)
                break
            except Exception as e:  # noqa: BLE001 - any network/hash failure: try the next mirror
                errors.append(f"{mirror}: {e}")
        else:
            files = "\n  ".join(f"{s}.gz" for s in STEMS.values())
            raise DataError(
                f"the {name} dataset is not on this machine and could not be downloaded "
                f"({errors[-1]}).\nPut these four files (from any MNIST mirror, gzip or not) in "
                f"{target}:\n  {files}\nor point --data-dir / CNNMNIST_DATA_DIR at a directory "
                f"that holds them."
            )
    return paths


def parse_idx(data: bytes, where: str, ndim: int) -> np.ndarray:
    """Parse IDX bytes of unsigned bytes with the given number of dimensions, validating it."""
    if len(data) < 4:
        raise DataError(f"{where}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DataError(
            f"{where}: bad magic number 0x{data[:4].hex()} (expected 0x000008{ndim:02x}, "
            "an IDX file of unsigned bytes)"
        )
    if dims != ndim:
        raise DataError(f"{where}: has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{where}: truncated header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if ndim == 3 and shape[1:] != (28, 28):
        raise DataError(f"{where}: images are {shape[1]}x{shape[2]}, expected 28x28")
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(data) != expected:
        raise DataError(
            f"{where}: {len(data)} bytes, but its header declares {shape} "
            f"({expected} bytes): the file is truncated or corrupted"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _idx_bytes(array: np.ndarray) -> bytes:
    """The canonical IDX encoding of a uint8 array (so npz content hashes like the IDX file)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def read_idx(path: Path, ndim: int) -> tuple[np.ndarray, str]:
    """Read an IDX file (gzip or raw): the array and the MD5 of its decompressed bytes."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
            f.seek(0)
            if magic == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=f) as g:
                    data = g.read(MAX_DECOMPRESSED + 1)
            else:
                data = f.read(MAX_DECOMPRESSED + 1)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if len(data) > MAX_DECOMPRESSED:
        raise DataError(f"{path}: larger than {MAX_DECOMPRESSED >> 20} MiB, not an MNIST file")
    return parse_idx(data, str(path), ndim), hashlib.md5(data).hexdigest()


def _check_npz_headers(path: Path) -> None:
    """Refuse an npz whose arrays are not small uint8 ones, from the headers alone: reading
    an array decompresses all of it, and a few megabytes can declare gigabytes."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            for key in NPZ_KEYS.values():
                if f"{key}.npy" not in archive.namelist():
                    continue
                with archive.open(f"{key}.npy") as member:
                    major, _ = np.lib.format.read_magic(member)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if major == 1
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(member)
                size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if dtype != np.uint8 or size > MAX_DECOMPRESSED:
                    raise DataError(
                        f"{path}: {key} declares {dtype}{list(shape)} ({size >> 20} MiB); "
                        f"expected uint8 MNIST arrays under {MAX_DECOMPRESSED >> 20} MiB"
                    )
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a valid npz file: {e}") from None


def read_npz(path: Path) -> dict[str, tuple[np.ndarray, str]]:
    """Read a Keras-style npz (never unpickling): role -> (array, MD5 of its IDX encoding)."""
    _check_npz_headers(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {role: npz[key] for role, key in NPZ_KEYS.items() if key in npz.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(
                f"{path}: contains pickled Python objects; refusing to load it"
            ) from None
        raise DataError(f"{path}: not a valid npz file: {e}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a valid npz file: {e}") from None
    missing = [NPZ_KEYS[r] for r in NPZ_KEYS if r not in arrays]
    if missing:
        raise DataError(f"{path}: missing array(s) {', '.join(missing)}")
    out = {}
    for role, array in arrays.items():
        ndim = 3 if role.endswith("images") else 1
        if array.dtype != np.uint8 or array.ndim != ndim:
            raise DataError(
                f"{path}: {NPZ_KEYS[role]} is {array.dtype}{list(array.shape)}, "
                f"expected uint8 with {ndim} dimensions"
            )
        # Parsing our own encoding applies the same shape checks as an IDX file.
        encoded = _idx_bytes(array)
        out[role] = (
            parse_idx(encoded, f"{path}:{NPZ_KEYS[role]}", ndim),
            hashlib.md5(encoded).hexdigest(),
        )
    return out


def _read_role(
    source: dict[str, Path] | Path, role: str, npz_cache: dict
) -> tuple[np.ndarray, str]:
    if isinstance(source, dict):
        return read_idx(source[role], 3 if role.endswith("images") else 1)
    if not npz_cache:
        npz_cache.update(read_npz(source))
    return npz_cache[role]


def _where(source: dict[str, Path] | Path, role: str) -> Path:
    return source[role] if isinstance(source, dict) else source


def check(name: str = "mnist", data_dir: Path | None = None) -> tuple[Path, list[FileCheck]]:
    """Read and verify every file of a dataset without stopping at the first fault."""
    dataset = spec(name)
    if data_dir is not None:  # the directory named, never another one found elsewhere
        source = _sources(Path(data_dir), name) if Path(data_dir).is_dir() else None
        if source is None:
            raise DataError(f"{data_dir}: {_missing_message(name, data_dir, only=True)}")
        found = (Path(data_dir), source)
    else:
        found = locate(name, data_dir)
    if found is None:
        raise DataError(_missing_message(name, data_dir))
    directory, source = found
    results, npz_cache = [], {}
    for role, stem in STEMS.items():
        result = FileCheck(role, _where(source, role), expected_md5=dataset.md5[stem])
        try:
            array, result.md5 = _read_role(source, role, npz_cache)
            result.shape = tuple(array.shape)
            if result.md5 != result.expected_md5:
                result.error = "checksum mismatch"
        except DataError as e:
            result.error = str(e)
        results.append(result)
    return directory, results


def load(name: str = "mnist", data_dir: Path | None = None, allow_download: bool = True) -> Dataset:
    """Find (or download), parse and verify a dataset; any fault raises DataError."""
    dataset = spec(name)
    found = locate(name, data_dir)
    if found is None:
        target = download_dir(name, data_dir)
        if not allow_download:
            raise DataError(_missing_message(name, data_dir))
        found = (target, download(name, target))
    directory, source = found
    npz_cache: dict = {}
    read = {role: _read_role(source, role, npz_cache) for role in STEMS}
    arrays = {role: array for role, (array, _) in read.items()}
    for part in ("train", "test"):
        n_images, n_labels = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
        if n_images != n_labels:
            raise DataError(
                f"{_where(source, part + '_labels')}: {n_labels} labels, but "
                f"{_where(source, part + '_images')} has {n_images} images"
            )
    checksums = {}
    for role, stem in STEMS.items():
        md5 = read[role][1]
        if md5 != dataset.md5[stem]:
            raise DataError(
                f"{_where(source, role)}: checksum mismatch: decompressed content has MD5 {md5}, "
                f"the canonical {name} {stem} has {dataset.md5[stem]}"
            )
        checksums[stem] = md5
    return Dataset(name=name, source=directory, checksums=checksums, **arrays)


def _missing_message(name: str, data_dir: Path | None, only: bool = False) -> str:
    files = ", ".join(f"{s}.gz" for s in STEMS.values())
    if only:
        what = "no such directory" if not Path(data_dir).is_dir() else f"no {name} files here"
        return f"{what}; expected the files {files} (or {name}.npz)"
    places = ", ".join(str(d) for d in candidate_dirs(name, data_dir))
    return f"the {name} dataset was not found in {places}; expected the files {files}"
