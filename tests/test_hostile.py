"""Careless and hostile input, table-driven: each case exits with its code and a message that
names the path or value, prints no traceback, and leaves every file that was there
byte-identical. Cases that could exhaust memory run in a child under an address-space limit,
so a regression fails the test instead of the machine."""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnmnist import checkpoint, files, presets, runners
from cnnmnist.cli import cli
from cnnmnist.errors import CheckpointError, CnnmnistError, UsageError
from cnnmnist.preprocess.read import MAX_BYTES
from cnnmnist.training import resume

MEMORY_LIMIT = 3 * 2**30 // 2  # 1.5 GiB of address space: predict needs about 0.5 here


def tree_hashes(root: Path) -> dict[str, str]:
    """Every file under root (hidden ones too) -> SHA-256 of its bytes; a file larger than the
    tool ever reads (the sparse 3 GB one) -> its size and modification time: hashing it
    twice was most of the suite's slowest hostile case."""

    def signature(path: Path) -> str:
        stat = path.stat()
        if stat.st_size > MAX_BYTES:
            return f"{stat.st_size} bytes, modified {stat.st_mtime_ns}"
        return hashlib.sha256(path.read_bytes()).hexdigest()

    return {str(p.relative_to(root)): signature(p) for p in sorted(root.rglob("*")) if p.is_file()}


def cnnmnist_limited(args: list[str], cwd: Path, stdin=None) -> subprocess.CompletedProcess:
    """`cnnmnist ARGS` in a child; `predict` and `data` (which read users' bytes without
    TensorFlow) have their address space capped at MEMORY_LIMIT. TensorFlow itself reserves
    more address space than that, whatever it uses."""

    def limit() -> None:
        if args[0] in ("predict", "data"):
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run(
        [sys.executable, "-m", "cnnmnist", *args],
        cwd=cwd,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit,
    )


@pytest.fixture
def place(tmp_path, trained, mnist):
    """A working directory with a user's data, notes, a checkpoint and a digit image."""
    (tmp_path / "data").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "NOTES.txt"):
        (tmp_path / "data" / name).write_bytes(os.urandom(64))
    (tmp_path / "afile").write_text("a user's file\n")
    shutil.copytree(trained.checkpoint, tmp_path / "ckpt")
    Image.fromarray(255 - mnist.test_images[0]).save(tmp_path / "seven.png")  # a 7, on paper
    return tmp_path


def bad_toml(place: Path) -> str:
    (place / "run.toml").write_text('preset = "mlp"\nseed = -1\n')
    return "run.toml"


# (name, arguments (with {place} filled in), exit code, text the message must contain)
CASES = [
    (
        "force on a data directory",
        ["train", "--out", "data", "--force"],
        1,
        "data: not a cnnmnist checkpoint",
    ),
    ("force on a file", ["train", "--out", "afile", "--force"], 1, "afile: is a file"),
    ("out is the current directory", ["train", "--out", "."], 2, "'.' does not name"),
    ("out is the parent directory", ["train", "--out", ".."], 2, "'..' does not name"),
    ("out is the root", ["train", "--out", "/"], 2, "'/' does not name"),
    ("out is empty", ["train", "--out", ""], 2, "does not name a checkpoint directory"),
    ("negative seed", ["train", "--seed", "-1", "--out", "new"], 2, "-1 is not in the range"),
    ("seed over 32 bits", ["train", "--seed", "4294967296", "--out", "new"], 2, "4294967296"),
    (
        "seed in a run file",
        ["train", "--config", "run.toml", "--out", "new"],
        2,
        "run.toml: seed must be",
    ),
    (
        "devices of no known form",
        ["train", "--devices", "bogus", "--out", "new"],
        2,
        "'bogus' is not a device",
    ),
    (
        "a device named twice",
        ["train", "--devices", "/cpu:0,/CPU:0", "--out", "new"],
        2,
        "named twice",
    ),
    ("out under a file", ["train", "--out", "afile/ckpt"], 1, "afile"),
    (
        "a GPU this machine lacks",
        ["train", "--strategy", "one-device", "--devices", "/gpu:7", "--out", "new"],
        1,
        "/gpu:7 not on this machine",
    ),
    (
        "errors picture under a file",
        ["evaluate", "ckpt", "--errors", "afile/x.png", "--split", "validation"],
        1,
        "afile",
    ),
    (
        "data-dir that does not exist",
        ["data", "--data-dir", "no-such-dir"],
        1,
        "no-such-dir: no such directory",
    ),
    ("data-dir without a dataset", ["data", "--data-dir", "ckpt"], 1, "ckpt: no mnist files here"),
    (
        "predict from /dev/zero",
        ["predict", "--model", "ckpt", "/dev/zero", "--json"],
        1,
        "/dev/zero: larger than 64 MiB",
    ),
    (
        "predict a file of 3 GB",
        ["predict", "--model", "ckpt", "huge.png", "--json"],
        1,
        "huge.png: larger than 64 MiB",
    ),
    (
        "predict a LAB TIFF among good files",
        ["predict", "--model", "ckpt", "lab.tif", "seven.png", "--json"],
        1,
        "lab.tif: cannot decode the image",
    ),
    (
        "npz that declares gigabytes",
        ["data", "--data-dir", "bomb", "--json"],
        1,
        "x_train declares uint8[4000000, 28, 28]",
    ),
    ("npy renamed to npz", ["data", "--data-dir", "npy", "--json"], 1, "not a valid npz file"),
    # Nothing lost: output paths.
    (
        "a user's folder named OUT.partial",
        ["train", "--epochs", "1", "--train-size", "500", "--out", "thesis"],
        1,
        "thesis.partial: not an interrupted cnnmnist run (it holds ch1.tex)",
    ),
    (
        "a user's folder named OUT.partial, with --force",
        ["train", "--epochs", "1", "--train-size", "500", "--out", "thesis", "--force"],
        1,
        "thesis.partial: not an interrupted cnnmnist run (it holds ch1.tex)",
    ),
    (
        "force on a folder that only looks like a checkpoint",
        ["train", "--epochs", "1", "--out", "lookalike", "--force"],
        1,
        "lookalike: not a cnnmnist checkpoint (it holds assets/",
    ),
    (
        "force on a folder with a checkpoint's names but not its metadata",
        ["train", "--epochs", "1", "--out", "namesake", "--force"],
        1,
        "namesake: not a cnnmnist checkpoint (corrupted metadata",
    ),
    (
        "a link planted in OUT.partial",
        ["train", "--epochs", "1", "--train-size", "500", "--out", "sl"],
        1,
        "sl.partial: not an interrupted cnnmnist run (it holds state.json.tmp)",
    ),
    (
        "a link planted as the lock file",
        ["train", "--epochs", "1", "--train-size", "500", "--out", "locked"],
        1,
        ".locked.lock: is not a lock file this tool made",
    ),
    (
        "plot onto the checkpoint's metadata",
        ["inspect", "ckpt", "--plot", "ckpt/cnnmnist.json"],
        2,
        "cannot write .json; give a name ending in .png, .svg, .pdf",
    ),
    (
        "plot into the checkpoint",
        ["inspect", "ckpt", "--plot", "ckpt/curves.png"],
        1,
        "inside the checkpoint ckpt",
    ),
    (
        "errors picture onto a document",
        ["evaluate", "ckpt", "--errors", "thesis.docx"],
        2,
        "cannot write .docx; give a name ending in .png",
    ),
    (
        "plot as JPEG bytes into a .jpg",
        ["evaluate", "ckpt", "--plot", "x.jpg"],
        2,
        "cannot write .jpg",
    ),
    (
        "plot into a folder that does not exist",
        ["inspect", "ckpt", "--plot", "no/such/dir/x.png"],
        1,
        "the folder no/such/dir does not exist",
    ),
    (
        "predict --show onto an input",
        ["predict", "--model", "ckpt", "--show", "seven.png", "seven.png"],
        2,
        "seven.png exists; --show writes a new file",
    ),
    (
        "an --out too long for its temporary names",
        ["train", "--epochs", "1", "--out", "c" * 240],
        2,
        "its name is 240 bytes long",
    ),
    # Bounded reads and clear messages.
    ("huge metadata", ["inspect", "bigmeta"], 1, "corrupted metadata (larger than 16 MiB)"),
    (
        "deeply nested metadata",
        ["inspect", "deepmeta"],
        1,
        "corrupted metadata (nested too deeply)",
    ),
    (
        "deeply nested resume state",
        ["train", "--resume", "--out", "deepstate"],
        1,
        "corrupted resume state (nested too deeply)",
    ),
    ("deeply nested run file", ["train", "--config", "deep.toml"], 2, "nested too deeply"),
    (
        "a batch of a trillion images",
        ["evaluate", "ckpt", "--batch-size", "1000000000000"],
        2,
        "1000000000000 is not in the range",
    ),
    (
        "a preset name of 100 kB",  # as long as one argument may be
        ["train", "--preset", "p" * 100_000, "--out", "new"],
        2,
        "unknown preset 'ppppppppppppppppppppppppppppppppppppp...'",
    ),
    ("a model name of dots", ["serve", "ckpt", "--model-name", ".."], 2, "starting with a letter"),
    ("an empty host", ["serve", "ckpt", "--host", ""], 2, "give an address to listen on"),
]
PREPARE = {
    "seed in a run file": bad_toml,
    "a user's folder named OUT.partial": lambda place: _thesis(place),
    "a user's folder named OUT.partial, with --force": lambda place: _thesis(place),
    "force on a folder that only looks like a checkpoint": lambda place: _lookalike(place),
    "force on a folder with a checkpoint's names but not its metadata": lambda place: _namesake(
        place
    ),
    "a link planted in OUT.partial": lambda place: _planted(place, "sl.partial/state.json.tmp"),
    "a link planted as the lock file": lambda place: _planted(place, ".locked.lock"),
    "huge metadata": lambda place: _metadata(place, "bigmeta", None),
    "deeply nested metadata": lambda place: _metadata(place, "deepmeta", "[" * 100_000),
    "deeply nested resume state": lambda place: _deep(place / "deepstate.partial" / "state.json"),
    "deeply nested run file": lambda place: (place / "deep.toml").write_text(
        "x = " + "[" * 5000 + "]" * 5000 + "\n"
    ),
    "predict a file of 3 GB": lambda place: _sparse(place / "huge.png", 3 * 2**30),
    "predict a LAB TIFF among good files": lambda place: Image.new("LAB", (40, 40)).save(
        place / "lab.tif"
    ),
    "npz that declares gigabytes": lambda place: _npz_bomb(place / "bomb" / "mnist.npz"),
    "npy renamed to npz": lambda place: _npy_as_npz(place / "npy" / "mnist.npz"),
}


def _thesis(place: Path) -> None:
    (place / "thesis.partial").mkdir()
    (place / "thesis.partial" / "ch1.tex").write_text("\\chapter{One}\n")


def _lookalike(place: Path) -> None:
    """A user's folder holding a checkpoint's top-level names: {} as cnnmnist.json, a photo
    in assets/, an empty variables/."""
    folder = place / "lookalike"
    (folder / "assets").mkdir(parents=True)
    (folder / "variables").mkdir()
    (folder / "cnnmnist.json").write_text("{}")
    (folder / "assets" / "photo.jpg").write_bytes(os.urandom(100))


def _namesake(place: Path) -> None:
    folder = place / "namesake"
    folder.mkdir()
    (folder / "cnnmnist.json").write_text("{}")
    (folder / "saved_model.pb").write_bytes(b"not a model")


def _planted(place: Path, link: str) -> None:
    """A link where training writes, leading to a file of the user's (the decoy)."""
    (place / "decoy").write_text("a user's file the link leads to\n")
    (place / link).parent.mkdir(parents=True, exist_ok=True)
    (place / link).symlink_to(place / "decoy")


def _metadata(place: Path, name: str, content: str | None) -> None:
    shutil.copytree(place / "ckpt", place / name)
    if content is None:
        _sparse(place / name / "cnnmnist.json", 2**30)
    else:
        (place / name / "cnnmnist.json").write_text(content)


def _deep(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("[" * 100_000)


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _npz_bomb(path: Path) -> None:
    """An npz of a few MB whose x_train declares 4M x 28 x 28 bytes."""
    path.parent.mkdir()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (4_000_000, 28, 28)}
    )
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("x_train.npy", "w", force_zip64=True) as member:
            member.write(header.getvalue())
            for _ in range(64):
                member.write(bytes(1 << 20))


def _npy_as_npz(path: Path) -> None:
    path.parent.mkdir()
    with open(path, "wb") as f:
        np.save(f, np.zeros(3, np.uint8))


@pytest.mark.parametrize("name, args, code, message", CASES, ids=[c[0] for c in CASES])
def test_hostile_input(name, args, code, message, place):
    if name in PREPARE:
        PREPARE[name](place)
    before = tree_hashes(place)
    result = cnnmnist_limited(args, cwd=place)
    assert result.returncode == code, result.stderr[-2000:]
    # The message: on stderr, or, for a per-file error, in that file's --json record.
    assert message in result.stderr + result.stdout, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    after = tree_hashes(place)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing changed ...
    assert not [k for k in after if k not in before and k.startswith(".")]  # ... or left


def test_predict_from_stdin_of_dev_zero_is_bounded(place):
    with open("/dev/zero", "rb") as zero:
        result = cnnmnist_limited(["predict", "--model", "ckpt", "-"], cwd=place, stdin=zero)
    assert result.returncode == 1 and "<stdin>: larger than 64 MiB" in result.stderr


def test_a_huge_photo_is_read_within_bounded_memory(place):
    # 7000 x 7000 RGBA (under the pixel cap): 3.1 GB peak before; now scaled down at decode.
    pixels = np.zeros((7000, 7000, 4), np.uint8)
    pixels[..., 3] = 255
    pixels[2500:4500, 3300:3700, :3] = 255  # a white bar: a "1" on black
    Image.fromarray(pixels).save(place / "big.png")
    result = cnnmnist_limited(["predict", "--model", "ckpt", "big.png", "--json"], cwd=place)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)[0]["digit"] is not None


def test_a_lab_tiff_fails_alone(place):
    Image.new("LAB", (40, 40)).save(place / "lab.tif")
    result = CliRunner().invoke(
        cli,
        [
            "predict",
            "--model",
            str(place / "ckpt"),
            "--json",
            str(place / "lab.tif"),
            str(place / "seven.png"),
        ],
    )
    rows = json.loads(result.stdout)
    assert rows[0]["error"] and rows[1]["digit"] is not None  # the good file still answered


def test_a_damaged_tflite_copy_is_not_used(place, mnist):
    ckpt = place / "ckpt"
    with open(ckpt / checkpoint.TFLITE, "r+b") as f:  # overwrite part of the weights
        f.seek(4096)
        f.write(os.urandom(8192))
    warnings = []
    engine = runners.load(checkpoint.read(ckpt), warnings.append)
    assert engine.name == "savedmodel" and "does not match the checksum" in warnings[0]
    result = CliRunner().invoke(cli, ["predict", "--model", str(ckpt), str(place / "seven.png")])
    assert "does not match the checksum" in result.stderr
    assert "savedmodel" in result.stdout


def test_evaluate_refuses_an_errors_picture_it_cannot_write_before_any_work(place):
    """--errors under a file: refused before the evaluation runs (once, the report was
    printed and the picture failed after it), so no minutes are spent on a run whose picture
    cannot be written, and nothing is created."""
    before = tree_hashes(place)
    result = CliRunner().invoke(
        cli,
        ["evaluate", str(place / "ckpt"), "--json", "--errors", str(place / "afile" / "x.png")],
    )
    assert result.exit_code == 1 and "afile" in result.stderr
    assert result.stdout == ""  # refused before the evaluation: no report
    assert tree_hashes(place) == before


def test_evaluate_replaces_an_existing_errors_picture_atomically(place):
    target = place / "errors.png"
    Image.new("L", (4, 4)).save(target)  # an old picture (a file that is not one is refused)
    result = CliRunner().invoke(cli, ["evaluate", str(place / "ckpt"), "--errors", str(target)])
    assert result.exit_code == 0, result.output
    assert f"replaced {target}" in result.stderr
    assert Image.open(target).format == "PNG"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal file, not a temporary's
    assert [p.name for p in place.iterdir() if p.name.startswith(".errors")] == []


def test_evaluate_does_not_replace_a_file_that_is_not_a_picture(place):
    target = place / "errors.png"
    target.write_bytes(b"a user's notes")
    result = CliRunner().invoke(cli, ["evaluate", str(place / "ckpt"), "--errors", str(target)])
    assert result.exit_code == 1 and "is not a PNG picture" in result.stderr
    assert target.read_bytes() == b"a user's notes"


def test_stdout_on_a_full_device_is_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "cnnmnist", "presets"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1 and "No space left on device" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_star_in_out_is_a_character_not_a_pattern(tmp_path):
    other = tmp_path / ".ab.old-999999-0"  # another checkpoint's crash backup
    other.mkdir()
    files.recover(tmp_path / "a*")
    assert other.exists() and not (tmp_path / "a*").exists()


def test_a_byte_order_mark_in_a_run_file_is_fine(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes('\ufeffpreset = "mlp"\nepochs = 2\n'.encode())
    assert presets.load_config(path) == {"preset": "mlp", "epochs": 2}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"dataset": "mnist"}, "dataset"),
        ({"format_version": True}, "format_version"),
        ({"history": [{"epoch": "one"}]}, "history[0].epoch"),
        ({"test": {"accuracy": 7, "loss": 0.1, "n": 5}}, "test.accuracy"),
        ({"fast_path": {"file": 3}}, "fast_path.file"),
    ],
)
def test_tampered_metadata_names_the_field(change, field, place):
    meta_path = place / "ckpt" / checkpoint.METADATA
    meta = json.loads(meta_path.read_text()) | change
    meta_path.write_text(json.dumps(meta))
    for command in (["inspect"], ["evaluate"]):
        result = CliRunner().invoke(cli, [*command, str(place / "ckpt")])
        assert result.exit_code == 1, result.output
        assert f"corrupted metadata: {field}" in result.output


VALID_STATE = {
    "format_version": 1,
    "epoch": 2,
    "model": "epoch-2.keras",
    "seed_states": [[0, 1]],
    "history": [{"epoch": 1, "loss": 0.5, "accuracy": 0.9}],
    "recipe": {"name": "seed", "description": "", "model": "seed", "epochs": 5},
    "options": {"dataset": "mnist", "data_dir": None},
}


@pytest.mark.parametrize(
    "change, field",
    [
        ({"recipe": {**VALID_STATE["recipe"], "validation_size": "abc"}}, "recipe"),
        ({"seed_states": "none"}, "seed_states"),
        ({"model": "../../elsewhere.keras"}, "model"),
        ({"epoch": -1}, "epoch"),
        ({"options": {"dataset": "cifar", "data_dir": None}}, "options.dataset"),
    ],
)
def test_tampered_resume_state_names_the_field(change, field, tmp_path):
    out = tmp_path / "ckpt"
    resume.partial_dir(out).mkdir(parents=True)
    (resume.partial_dir(out) / resume.STATE).write_text(json.dumps(VALID_STATE | change))
    with pytest.raises(CnnmnistError, match=f"corrupted resume state: {field}".replace("[", r"\[")):
        resume.load_state(out)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


def _fake_checkpoint(root: Path) -> Path:
    ckpt = root / "fuzz-ckpt"
    (ckpt / "variables").mkdir(parents=True, exist_ok=True)
    for name in (
        "saved_model.pb",
        "variables/variables.index",
        "variables/variables.data-0",
        checkpoint.KERAS_MODEL,
    ):
        (ckpt / name).write_bytes(b"")
    return ckpt


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    field=st.sampled_from(
        [
            "format_version",
            "preset",
            "dataset",
            "history",
            "test",
            "fast_path",
            "reference_accuracy",
            "warnings",
            "versions",
        ]
    ),
    value=JSON,
)
def test_fuzzed_metadata_is_read_or_refused_with_a_message(field, value, tmp_path):
    ckpt = _fake_checkpoint(tmp_path)
    meta = {
        "format_version": 1,
        "preset": "seed",
        "dataset": {"name": "mnist", "validation_size": 0},
        "history": [],
        "test": {"accuracy": 0.5, "loss": 1.0, "n": 10},
    }
    (ckpt / checkpoint.METADATA).write_text(json.dumps(meta | {field: value}))
    try:
        read = checkpoint.read(ckpt)
    except CheckpointError as e:
        assert str(ckpt) in str(e)
        return
    from cnnmnist.render import metadata_summary

    metadata_summary(str(ckpt), read.metadata)  # what `inspect` renders must not crash


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(field=st.sampled_from(sorted(VALID_STATE)), value=JSON)
def test_fuzzed_resume_state_is_read_or_refused_with_a_message(field, value, tmp_path):
    out = tmp_path / "fuzz"
    resume.partial_dir(out).mkdir(parents=True, exist_ok=True)
    (resume.partial_dir(out) / resume.STATE).write_text(json.dumps(VALID_STATE | {field: value}))
    try:
        resume.load_state(out)
    except (CnnmnistError, UsageError) as e:
        assert "resume state" in str(e) or "newer cnnmnist" in str(e)


@pytest.mark.parametrize(
    "args",
    [
        ["predict", "--model", "ckpt", "seven.png"],
        ["inspect", "ckpt"],
        ["train", "--out", "new/ckpt"],
    ],
)
def test_permission_errors_are_one_line(args, place, monkeypatch):
    """As root (CI) nothing is unreadable, so the OS refusal is simulated where it happens:
    predict opening an image file, inspect opening the metadata, train making a folder."""
    import pathlib

    from cnnmnist.preprocess import read

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    owner, name = {
        "predict": (read, "open"),  # the module's own `open`, in front of the builtin
        "inspect": (files, "open"),
        "train": (pathlib.Path, "mkdir"),
    }[args[0]]
    monkeypatch.chdir(place)
    monkeypatch.setattr(owner, name, refuse, raising=False)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, result.output
    assert "Permission denied" in result.output and "Traceback" not in result.output


KILL_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
from cnnmnist import files
tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
files._exchange = lambda a, b: False  # a file system without an atomic swap
rename = os.rename
def rename_then_die(a, b):
    rename(a, b)
    if Path(b).name.startswith("." + out.name + ".old-"):
        os.kill(os.getpid(), signal.SIGKILL)  # between the two renames
os.rename = rename_then_die
files.swap_in(tmp, out)
"""


def test_a_writer_killed_between_its_renames_loses_no_checkpoint(place):
    """The window a kill -9 could hit where the file system has no atomic swap: the old
    checkpoint moved aside, the new one not yet in place. Every reader puts it back."""
    new = place / ".ckpt.tmp-1-new"
    shutil.copytree(place / "ckpt", new)
    before = tree_hashes(place / "ckpt")
    done = subprocess.run(
        [sys.executable, "-c", KILL_BETWEEN_RENAMES, str(new), str(place / "ckpt")],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == -signal.SIGKILL
    assert not (place / "ckpt").exists()  # the window itself: nothing at OUT
    result = CliRunner().invoke(cli, ["inspect", str(place / "ckpt"), "--json"])
    assert result.exit_code == 0, result.output
    assert tree_hashes(place / "ckpt") == before  # the good one, back in place
    assert not [p for p in place.iterdir() if p.name.startswith(".ckpt.old-")]


def test_escape_sequences_in_names_and_metadata_reach_no_terminal(place):
    meta = json.loads((place / "ckpt" / "cnnmnist.json").read_text())
    meta["preset"] = "\u001b[2J\u001b[31mEVIL\u0007"
    (place / "ckpt" / "cnnmnist.json").write_text(json.dumps(meta))
    shown = CliRunner().invoke(cli, ["inspect", str(place / "ckpt")])
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.stdout and "\x07" not in shown.stdout
    assert "\\x1b[2J\\x1b[31mEVIL\\x07" in shown.stdout  # shown, escaped
    evil = place / "\u001b[31mred[bold]x.png"
    shutil.copy(place / "seven.png", evil)
    result = CliRunner().invoke(cli, ["predict", "--model", str(place / "ckpt"), str(evil)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\\x1b[31mred[bold]x.png" in result.stdout


def test_a_tflite_copy_the_metadata_does_not_record_is_not_run(place):
    meta = json.loads((place / "ckpt" / "cnnmnist.json").read_text())
    meta["fast_path"] = {"file": None, "reason": "conversion failed"}
    (place / "ckpt" / "cnnmnist.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(
        cli, ["predict", "--model", str(place / "ckpt"), str(place / "seven.png"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "does not record it" in result.stderr
    assert json.loads(result.stdout)[0]["engine"] == "savedmodel"


def test_a_users_keras_json_does_not_change_training(tmp_path, mnist_dir):
    keras_home = tmp_path / "keras"
    keras_home.mkdir()
    (keras_home / "keras.json").write_text(json.dumps({"floatx": "float16", "epsilon": 0.1}))
    out = tmp_path / "ckpt"
    done = subprocess.run(
        [sys.executable, "-m", "cnnmnist", "train", "--epochs", "1", "--train-size", "500"]
        + ["--validation-size", "0", "--out", str(out), "--json"],
        env={**os.environ, "KERAS_HOME": str(keras_home)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, keras, cnnmnist.model\n"
            "net = keras.saving.load_model(sys.argv[1])\n"
            "print(net.optimizer.learning_rate.dtype, float(net.optimizer.learning_rate),"
            " {w.dtype for w in net.weights})",
            str(out / "model.keras"),
        ],
        env={**os.environ, "KERAS_HOME": str(tmp_path / "plain")},  # read without it
        capture_output=True,
        text=True,
        timeout=120,
    )
    dtype, rate = check.stdout.split()[:2]
    assert dtype == "float32" and abs(float(rate) - 1e-3) < 1e-9, check.stdout + check.stderr
    assert "float16" not in check.stdout


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("TF_CONFIG", "[" * 100_000, "TF_CONFIG is not a valid cluster description"),
        ("CNNMNIST_DATA_DIR", "afile", "names a file, not a folder"),
    ],
)
def test_hostile_environment_is_one_line(variable, value, message, place):
    env = {**os.environ, variable: value, "XDG_CACHE_HOME": str(place / "cache")}
    env["KERAS_HOME"] = str(place / "keras")
    args = ["train", "--out", "new", "--epochs", "1"]
    if variable == "TF_CONFIG":
        args += ["--strategy", "multi-worker"]
    done = subprocess.run(
        [sys.executable, "-m", "cnnmnist", *args],
        cwd=place,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode in (1, 2) and message in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert (place / "afile").read_text() == "a user's file\n"


def test_closed_streams_and_a_narrow_encoding(place):
    def run(*args, **kw):
        return subprocess.run(
            [sys.executable, "-m", "cnnmnist", *args],
            cwd=place,
            capture_output=kw.pop("capture", True),
            text=True,
            timeout=120,
            **kw,
        )

    closed_stdin = run("predict", "--model", "ckpt", "-", preexec_fn=lambda: os.close(0))
    assert closed_stdin.returncode == 1 and "standard input is closed" in closed_stdin.stderr
    shutil.copy(place / "seven.png", place / "sieben-\u00fc\u00df.png")
    ascii_only = run(
        "predict", "--model", "ckpt", "sieben-\u00fc\u00df.png",
        env={**os.environ, "PYTHONIOENCODING": "ascii"},
    )  # fmt: skip
    assert ascii_only.returncode == 0 and "Traceback" not in ascii_only.stderr
    assert "sieben-\\xfc\\xdf.png" in ascii_only.stdout
    closed_stdout = subprocess.run(
        [sys.executable, "-m", "cnnmnist", "predict", "--model", "ckpt", "seven.png"],
        cwd=place,
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.close(1),
    )
    assert closed_stdout.returncode == 2 and "standard output is closed" in closed_stdout.stderr


def test_a_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    from cnnmnist import data
    from cnnmnist.errors import DataError

    def offline(dataset, target):
        raise DataError("no network")

    monkeypatch.setattr(data, "_download_into", offline)
    with pytest.raises(DataError):
        data.download("mnist", tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []
