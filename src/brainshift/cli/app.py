"""The typer app of the ``brainshift`` command line, its error handling and the ``version`` command.

Each command parses options and calls one library function; heavy modules (torch, SimpleITK, scipy) are
imported inside the commands so ``brainshift --help`` is instant. Any :class:`BrainshiftError` (bad input)
is printed as one line ``error: ...`` on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from brainshift.errors import BrainshiftError

app = typer.Typer(
    name="brainshift",
    help="Keypoint-based brain-shift compensation: sparse keypoints -> dense displacement field.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for commands: bad input becomes a one-line ``error:`` message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BrainshiftError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None
        except OSError as exc:  # missing files, a file where a folder is expected, permissions, full disk
            where = f" {exc.filename!s}" if exc.filename else ""
            typer.echo(f"error: expected a readable input / writable output path, got{where}: "
                       f"{exc.strerror or exc}", err=True)
            raise typer.Exit(code=2) from None
        except MemoryError:
            typer.echo("error: out of memory; use fewer keypoints, a coarser grid or another interpolator", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line: one ``warning: ...`` line, no source path or code line."""
    return f"warning: {message}\n"


@app.callback()
def _root() -> None:
    """Keypoint-based brain-shift compensation: sparse keypoints -> dense displacement field."""
    import warnings

    warnings.formatwarning = format_warning


@app.command()
def version() -> None:
    """Print the brainshift version."""
    from brainshift import __version__

    typer.echo(__version__)
