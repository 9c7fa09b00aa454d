"""The CLI starts without importing TensorFlow (`cnnmnist --help` must stay instant)."""

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
