"""The CLI starts without importing TensorFlow (`cnnmnist --help` must stay instant)."""

import os
import subprocess
import sys

import pytest

COMMANDS = ["", "train", "evaluate", "inspect", "predict", "data", "presets"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_does_not_import_tensorflow(command):
    code = f"""
import sys
from click.testing import CliRunner
from cnnmnist.cli import cli
result = CliRunner().invoke(cli, {command.split() + ["--help"]!r})
assert result.exit_code == 0, result.output
assert "Usage:" in result.output
heavy = [m for m in ("tensorflow", "keras") if m in sys.modules]
assert not heavy, heavy
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_console_script_help_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "cnnmnist", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for command in COMMANDS[1:]:
        assert command in proc.stdout


def _run(args, env=None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "cnnmnist", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def test_version_lists_the_libraries_without_importing_them():
    code = """
import sys
from click.testing import CliRunner
from cnnmnist.cli import cli
result = CliRunner().invoke(cli, ["--version"])
assert result.exit_code == 0, result.output
print(result.output)
assert not [m for m in ("tensorflow", "keras") if m in sys.modules]
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    from importlib import metadata

    assert lines[0].startswith("cnnmnist ")
    assert f"tensorflow {metadata.version('tensorflow')}" in lines
    assert f"keras {metadata.version('keras')}" in lines
    assert any(line.startswith("python 3.") for line in lines)
    assert any(line.startswith("native bfloat16: ") for line in lines)


@pytest.mark.parametrize(
    "words, offered",
    [
        ("cnnmnist train --preset b", ["best"]),
        ("cnnmnist presets s", ["seed", "seed-layers"]),
        ("cnnmnist train --preset ", ["seed", "seed-layers", "mlp", "best", "fast"]),
    ],
)
def test_shell_completion_offers_the_registered_presets(words, offered):
    env = {"_CNNMNIST_COMPLETE": "bash_complete", "COMP_WORDS": words}
    env["COMP_CWORD"] = str(len(words.split()) - (0 if words.endswith(" ") else 1))
    proc = _run([], env=env)
    assert proc.returncode == 0, proc.stderr
    assert [line.split(",", 1)[1] for line in proc.stdout.split()] == offered


@pytest.mark.parametrize("how", ["environment", "keras.json"])
def test_a_keras_user_with_another_backend_still_gets_tensorflow(how, tmp_path):
    """KERAS_BACKEND=jax (JAX is not installed) or a keras.json naming it: cnnmnist uses
    TensorFlow, the backend it is built on, instead of failing with a traceback."""
    env = {"KERAS_HOME": str(tmp_path)}
    if how == "environment":
        env["KERAS_BACKEND"] = "jax"
    else:
        (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    code = "import cnnmnist, keras; print(keras.backend.backend())"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "tensorflow"


NATIVE = ("I0000", "W0000", "E0000", "absl::InitializeLog", "XNNPACK", "oneDNN")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, mnist_dir):
    """A few steps of the mlp, trained in a subprocess: its stderr and its checkpoint."""
    out = tmp_path_factory.mktemp("quiet") / "ckpt"
    args = ["train", "--preset", "mlp", "--epochs", "1", "--train-size", "2000"]
    proc = _run([*args, "--data-dir", str(mnist_dir), "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc.stderr


def test_training_and_predicting_are_quiet_by_default(tiny_checkpoint, mnist, tmp_path):
    out, train_stderr = tiny_checkpoint
    from PIL import Image

    Image.fromarray(255 - mnist.test_images[0]).save(tmp_path / "seven.png")
    predicted = _run(["predict", "--model", str(out), str(tmp_path / "seven.png")])
    assert predicted.returncode == 0, predicted.stderr
    for stderr in (train_stderr, predicted.stderr):
        assert not [line for line in stderr.splitlines() if any(n in line for n in NATIVE)]
    assert "epoch 1/1" in train_stderr  # our own lines still come through
    loud = _run(["--verbose", "predict", "--model", str(out), str(tmp_path / "seven.png")])
    assert loud.returncode == 0 and "XNNPACK" in loud.stderr


def test_verbose_training_shows_tensorflows_lines(tmp_path, mnist_dir):
    args = ["--verbose", "train", "--preset", "mlp", "--epochs", "1", "--train-size", "1000"]
    proc = _run([*args, "--data-dir", str(mnist_dir), "--out", str(tmp_path / "c")])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert any(line.startswith(("I0000", "W0000", "E0000")) for line in proc.stderr.splitlines())


def test_a_failure_of_tensorflow_itself_is_not_hidden(tmp_path):
    """A TensorFlow that cannot load: its error still reaches the user."""
    fake = tmp_path / "fake" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ImportError('libtensorflow_framework.so.2: cannot open')"
    )
    env = {"PYTHONPATH": str(tmp_path / "fake")}
    proc = _run(["train", "--out", str(tmp_path / "c")], env=env)
    assert proc.returncode != 0
    assert "libtensorflow_framework.so.2: cannot open" in proc.stderr


@pytest.mark.parametrize(
    "line, routine",
    [
        (
            "WARNING: All log messages before absl::InitializeLog() is called are written",
            True,
        ),
        (
            "I0000 00:00:1795889430.907198   19805 cudart_stub.cc:31] Could not find cuda drivers",
            True,
        ),
        (
            "E0000 00:00:1795889434.122907   19805 cuda_platform.cc:52] failed call to cuInit: X",
            True,
        ),
        ("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", True),
        ("E0000 00:00:1795889434.122907   19805 op_kernel.cc:1840] OP_REQUIRES failed: OOM", False),
        ("F0000 00:00:1795889434.122907   19805 stream.cc:12] Check failed: ok", False),
        ("Segmentation fault (core dumped)", False),
        ("Traceback (most recent call last):", False),
    ],
)
def test_only_routine_native_lines_are_dropped(line, routine):
    from cnnmnist.quiet import NOISE

    assert bool(NOISE.match(line)) is routine


def test_predicting_one_image_stays_off_the_heavy_imports(trained, mnist, tmp_path):
    """The TFLite path of `predict` needs no TensorFlow (or Keras): either would add most of
    a second to a one-image prediction's start. (numpy's masked arrays, which np.median
    imports, cost under a hundredth: `python -X importtime -c "import numpy.ma"`.)"""
    from PIL import Image

    image = tmp_path / "digit.png"
    Image.fromarray(mnist.test_images[0]).save(image)
    args = ["predict", "--model", str(trained.checkpoint), str(image), "--json"]
    code = f"""
import sys
from click.testing import CliRunner
from cnnmnist.cli import cli
result = CliRunner().invoke(cli, {args!r})
assert result.exit_code == 0, result.output
assert '"engine": "tflite"' in result.output, result.output
heavy = [m for m in ("tensorflow", "keras") if m in sys.modules]
assert not heavy, heavy
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_piped_tables_keep_a_row_a_line_whatever_columns_says():
    # A parent that loaded readline exports COLUMNS to its children: a pipe still gets whole rows.
    from cnnmnist import presets

    proc = _run(["presets"], env={"COLUMNS": "72"})
    rows = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    assert proc.returncode == 0 and len(rows) == len(presets.all_presets())
