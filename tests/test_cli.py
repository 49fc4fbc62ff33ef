"""CLI conventions: --version, -h, examples and exit codes in every command's help, flags shown as flags,
``weights list --json``, shell completion, a closed output pipe, and progress output (nothing to do, failures once)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from avepipe.cli import app
from avepipe.version import __version__
from tests.helpers import make_clip, run_cli

runner = CliRunner()


def _commands(group: typer.core.TyperGroup, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        if getattr(command, "commands", None):
            found += _commands(command, prefix + (name,))
        else:
            found.append(prefix + (name,))
    return found


ALL_COMMANDS = _commands(typer.main.get_command(app))


def test_version_flag():
    for flag in ("--version", "-V"):
        result = runner.invoke(app, [flag])
        assert result.exit_code == 0 and result.output.strip() == f"avepipe {__version__}"


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=" ".join)
def test_every_command_has_short_help_an_example_and_the_exit_codes(command):
    result = runner.invoke(app, [*command, "-h"], env={"COLUMNS": "160"}, terminal_width=160)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "Examples:" in text and f"avepipe {' '.join(command)}" in text.split("Examples:")[1]
    assert "Exit codes:" in text and "2 usage error" in text and "143 SIGTERM" in text
    assert "<bool>" not in text  # flags are shown as flags, not as options taking a boolean


def test_at_least_the_documented_commands_exist():
    names = {" ".join(c) for c in ALL_COMMANDS}
    assert {"extract", "decode", "localize", "train", "evaluate", "models", "cache ls", "cache merge",
            "weights list", "weights download", "weights import", "weights verify", "dataset labels",
            "dataset import-ave"} <= names


def test_rich_markup_does_not_eat_bracketed_words():
    text = runner.invoke(app, ["train", "-h"], terminal_width=200).output
    assert "[model]" in text and "[train]" in text


def test_shell_completion_script():
    script = Path(sys.executable).parent / "avepipe"  # the installed console script, as a shell would run it
    result = subprocess.run([script, "--show-completion", "bash"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "_avepipe_completion" in result.stdout and "complete " in result.stdout


def test_weights_list_json(weights_dir):
    result = subprocess.run([sys.executable, "-m", "avepipe", "weights", "list", "--json"], capture_output=True,
                            text=True, env={**__import__("os").environ, "AVEPIPE_WEIGHTS_DIR": str(weights_dir)})
    assert result.returncode == 0, result.stderr
    records = {r["name"]: r for r in json.loads(result.stdout)}
    assert records["vgg19"]["official"] is True and records["vgg19"]["present"] is True
    assert records["vgg19"]["url"].startswith("https://") and records["vgg19"]["url"].endswith(".h5")
    assert records["vggish"]["state"] in ("missing", "official", "unofficial", "mismatch")


def test_weights_list_never_cuts_a_url(weights_dir):
    result = run_cli("weights", "list")  # 200 columns
    assert result.returncode == 0, result.stderr
    flat = re.sub(r"[│\s]+", "", result.stdout)
    assert "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5" in flat and "…" not in result.stdout
    assert "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/vgg19_weights_tf_dim_ordering_tf_" \
           "kernels_notop.h5" in flat


def test_a_closed_output_pipe_is_not_an_error(weights_dir):
    script = ("import sys; sys.argv = ['avepipe', 'models']; from avepipe.cli import main; main()")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away, as `| head` does
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141)
    assert "internal error" not in stderr and "Traceback" not in stderr


def test_progress_nothing_to_do_and_each_failure_printed_once(tmp_path, weights_args):
    clip = tmp_path / "ok.mp4"
    make_clip(clip, 1.0)
    bad = tmp_path / "notes.mp4"
    bad.write_text("not a video")
    cache = tmp_path / "f.h5"
    first = run_cli("extract", clip, bad, "--cache", cache, "--workers", "0", *weights_args)
    assert first.returncode == 1, first.stderr
    assert first.stderr.count("notes.mp4") == 1  # printed when it happened, not again in the summary
    assert "1 failed" in first.stderr and f"avepipe cache ls {cache} --failed" in first.stderr
    assert first.stderr.count("WARNING:") == first.stderr.count("WARNING: VGGish") == 1  # random VGGish, once
    again = run_cli("extract", clip, "--cache", cache, "--workers", "0", *weights_args)
    assert again.returncode == 0, again.stderr
    assert "nothing to extract: 1 video already in the cache: skipped" in again.stdout
    assert "0/0" not in again.stdout and "summary" not in again.stdout
