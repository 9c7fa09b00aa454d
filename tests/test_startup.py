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
