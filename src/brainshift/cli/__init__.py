"""The ``brainshift`` command line: a thin typer app; all typer code of the package lives in this package.

Each command parses options and calls one library function; heavy modules (torch, SimpleITK, scipy) are
imported inside the commands so ``brainshift --help`` is instant. Any :class:`BrainshiftError` (bad input)
is printed as one line ``error: ...`` on stderr with exit code 2, never a traceback
(:func:`brainshift.cli.app.cli_errors`). Library code reports through ``logging`` (logger ``brainshift``);
the command line shows its INFO records on stderr unless ``-q``.
"""

from __future__ import annotations

from brainshift.cli.app import app, cli_errors
from brainshift.cli.atlas import atlas_command
from brainshift.cli.demo import demo_command
from brainshift.cli.evaluate import evaluate_command
from brainshift.cli.infer import infer_command
from brainshift.cli.keypoints import keypoints_command
from brainshift.cli.landmarks import evaluate_landmarks_command
from brainshift.cli.match import match_command
from brainshift.cli.register import register_command
from brainshift.cli.simulate import simulate_batch_command, simulate_command
from brainshift.cli.train import train_command

app.command("infer")(infer_command)
app.command("register")(register_command)
app.command("demo")(demo_command)
app.command("evaluate")(evaluate_command)
app.command("evaluate-landmarks")(evaluate_landmarks_command)
app.command("keypoints")(keypoints_command)
app.command("match")(match_command)
app.command("train")(train_command)
app.command("simulate")(simulate_command)
app.command("simulate-batch")(simulate_batch_command)
app.command("atlas")(atlas_command)

__all__ = ["app", "cli_errors", "main"]


def main() -> None:  # console-script entry point
    """Entry point of the ``brainshift`` console script and of ``python -m brainshift``."""
    app(prog_name="brainshift")
