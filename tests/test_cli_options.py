"""Option values the command line refuses before any work: one line, exit code 2, nothing written."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from brainshift.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [
    ["demo", "--quick"],
    ["evaluate", "--data", "nowhere", "--methods", "linear"],
    ["simulate", "--demo"],
    ["simulate-batch", "--subjects", "1", "--cases-per-subject", "1"],
    ["train", "--data", "nowhere"],
])
def test_a_negative_seed_is_refused_before_anything_is_written(tmp_path, command):
    # numpy's seed sequences take only non-negative integers: -1 was a ValueError traceback from numpy
    out = tmp_path / "out"
    out_option = ["--save-dir" if command[0] == "train" else "-o", str(out)]
    res = runner.invoke(app, [*command, *out_option, "--seed", "-1"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: Invalid value for '--seed'") and "greater than or equal to 0" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf"])
def test_demo_refuses_a_resolution_that_is_not_a_positive_number_at_once(tmp_path, value):
    # 0, -3 and nan were refused by the simulator only after the subject's synthesis; inf passed its check
    out = tmp_path / "out"
    res = runner.invoke(app, ["demo", "-o", str(out), "--resolution", value, "--no-atlas"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: expected --resolution > 0 (mm, the simulation's element edge), got")
    assert len(res.output.splitlines()) == 1 and not out.exists()
