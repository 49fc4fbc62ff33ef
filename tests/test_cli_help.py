"""Every command's ``--help``, word for word, against the recorded text in tests/cli_help/ (one file per command).

The command line is a user-facing contract: a refactoring of avepipe/cli.py (issue 28 splits it into one module per
command group) must not change a command, an option, a default or a help line. A deliberate change is recorded with
``AVEPIPE_RECORD_HELP=1 python -m pytest tests/test_cli_help.py`` and shows up in review as a diff of these files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from avepipe.cli import app

RECORDED = Path(__file__).parent / "cli_help"


def _commands(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [prefix]
    for name, command in sorted(group.commands.items()):
        if getattr(command, "commands", None):
            found += _commands(command, prefix + (name,))
        else:
            found.append(prefix + (name,))
    return found


COMMANDS = _commands(typer.main.get_command(app))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "avepipe")
def test_help_is_unchanged(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "120", "NO_COLOR": "1"},
                                terminal_width=120)
    assert result.exit_code == 0, result.output
    recorded = RECORDED / (("-".join(command) or "avepipe") + ".txt")
    if os.environ.get("AVEPIPE_RECORD_HELP"):
        recorded.parent.mkdir(exist_ok=True)
        recorded.write_text(result.output)
    assert recorded.is_file(), f"no recorded help for {' '.join(command)!r}: record it (see the module docstring)"
    assert result.output == recorded.read_text()


def test_no_recorded_help_of_a_command_that_is_gone():
    names = {("-".join(c) or "avepipe") + ".txt" for c in COMMANDS}
    assert sorted(p.name for p in RECORDED.glob("*.txt") if p.name not in names) == []
