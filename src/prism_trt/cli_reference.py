"""The documentation's CLI reference (docs/cli.md), generated from the click commands' own --help text.

``python -m prism_trt.cli_reference`` prints it; ``python -m prism_trt.cli_reference --write docs/cli.md``
replaces the text between the markers in that file. A test keeps docs/cli.md in sync.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli import main

BEGIN, END = "<!-- cli-reference:begin -->", "<!-- cli-reference:end -->"
WIDTH = 100


def _walk(command: click.Command, path: list[str], parent: click.Context | None):
    # The command's own context settings (-h): click caches a command's help option from the first
    # context that asks, so leaving them out made the text depend on whether the CLI had run before.
    settings = {**command.context_settings, "terminal_width": WIDTH, "max_content_width": WIDTH}
    context = click.Context(command, info_name=" ".join(path), parent=parent, **settings)
    yield path, command.get_help(context)
    if isinstance(command, click.Group):
        for name in sorted(command.list_commands(context)):
            subcommand = command.get_command(context, name)
            if not subcommand.hidden:  # internal commands (the sweep's rank 0) are not for users
                yield from _walk(subcommand, path + [name], context)


def reference() -> str:
    parts = [BEGIN]
    for path, text in _walk(main, ["prism-trt"], None):
        parts.append(f"## `{' '.join(path)}`\n\n```text\n{text.rstrip()}\n```\n")
    parts.append(END)
    return "\n".join(parts)


def generated_part(text: str) -> str:
    """The text between (and including) the markers; ValueError when they are missing."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"no {BEGIN} ... {END} markers")
    return text[text.index(BEGIN): text.index(END) + len(END)]


def write(path: Path) -> None:
    """Replace the generated part of ``path`` with the current reference."""
    text = path.read_text()
    path.write_text(text.replace(generated_part(text), reference()))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"] and len(sys.argv) == 3:
        write(Path(sys.argv[2]))
    else:
        print(reference())
