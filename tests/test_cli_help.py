"""``--help`` of every command at 80 columns (and when piped, where typer's CliRunner is not a terminal either):
every option name in full, no type on flags, no line wider than the terminal."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from brainshift.cli import app

runner = CliRunner()
COMMANDS = sorted(typer.main.get_command(app).commands)


def _help(*args: str) -> str:
    res = runner.invoke(app, [*args, "--help"], terminal_width=80)
    assert res.exit_code == 0, res.output
    return res.output


def test_infer_help_shows_full_option_names_and_no_bool_type():
    # typer's rich panels cut names at 80 columns ("--preop_scan,-…", "--save-uncerta…", "--h5-compressi…"),
    # left a third of the width empty and showed "<bool>" on every flag, --help included
    text = _help("infer")
    for name in ("--preop_scan", "--preop-scan", "--kpt-intraop", "--save-uncertainty", "--h5-compression",
                 "--max-displacement", "--mirror-average / --no-mirror-average", "--safeguards / --no-safeguards",
                 "--min-field-rms", "--save-inverse", "--save-warped"):
        assert name in text, name
    assert "<bool>" not in text and "…" not in text
    assert "  --save-uncertainty  " in text and "  -q, --quiet  " in text  # a flag: its name, then its help


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_fits_80_columns_and_names_each_option_in_full(command):
    text = _help(command)
    assert text.startswith(f"Usage: brainshift {command}"), text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "<bool>" not in text and "…" not in text
    for param in typer.main.get_command(app).commands[command].params:
        for name in (*param.opts, *param.secondary_opts):
            if name.startswith("--"):
                assert name in text, name


def test_the_command_list_gives_each_command_its_first_sentence_in_full():
    text = _help()
    commands = text[text.index("Commands:"):]
    assert "..." not in commands  # click cut each summary to the width left on its line
    assert "Turn a preop image plus matched keypoints (or an initial\n" in text
    for command in COMMANDS:
        assert f"\n  {command} " in text, command


def test_demo_quick_help_gives_its_time_in_minutes():
    # "(seconds)" it said; the quick demo builds a small atlas and runs the network: ~3 min on 2 cores
    text = " ".join(_help("demo").split())
    assert "(seconds)" not in text and "about 1-3 minutes on a 2-core CPU" in text
