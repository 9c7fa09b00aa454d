"""The command-line reference (docs/cli.md), made from Click's own help, so that it says what
`--help` says: `python -m cnnmnist.reference > docs/cli.md`."""

from __future__ import annotations

import click

from cnnmnist.cli import cli

WIDTH = 100  # the help's width in the reference, whatever the terminal's


def _context(command: click.Command, name: str, parent: click.Context | None = None):
    # The contexts `cnnmnist ... --help` makes, with the group's settings (its -h): Click
    # caches a command's help option from the first context that asks for it.
    settings = {**cli.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    return click.Context(command, info_name=name, parent=parent, **settings)


def _help(command: click.Command, name: str, parent: click.Context | None = None) -> str:
    return command.get_help(_context(command, name, parent))


def markdown() -> str:
    """docs/cli.md: `cnnmnist --help`, then every command's, each in a section of its own."""
    root = _context(cli, "cnnmnist")
    parts = [
        "# Command-line reference",
        "",
        "Every command and option, as `--help` prints them (this page is made from the same "
        "text: `python -m cnnmnist.reference > docs/cli.md`).",
        "",
        "```",
        _help(cli, "cnnmnist"),
        "```",
    ]
    for name in cli.list_commands(root):
        parts += [
            "",
            f"## cnnmnist {name}",
            "",
            "```",
            _help(cli.commands[name], name, root),
            "```",
        ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(markdown(), end="")
