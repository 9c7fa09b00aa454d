"""docs/cli.md is what `--help` says, command by command (made by cnnmnist.reference)."""

from __future__ import annotations

from pathlib import Path

from cnnmnist import reference
from cnnmnist.cli import cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def test_the_cli_reference_is_current():
    assert DOC.read_text() == reference.markdown(), (
        "docs/cli.md is out of date: python -m cnnmnist.reference > docs/cli.md"
    )


def test_the_reference_covers_every_command_and_option():
    text = reference.markdown()
    for name, command in cli.commands.items():
        assert f"## cnnmnist {name}" in text
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--"):
                    assert opt in text, (name, opt)
                    assert param.help, f"{name} {opt} has no help"
