"""The ``brainshift`` command line: a thin typer app.

Each command parses options and calls one library function; heavy modules (torch, SimpleITK, scipy) are
imported inside the commands so ``brainshift --help`` is instant. Any :class:`BrainshiftError` (bad input)
is printed as one line ``error: ...`` on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
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
        except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
            typer.echo(f"error: cannot read or write {exc.filename!s}: {exc.strerror}", err=True)
            raise typer.Exit(code=2) from None
        except MemoryError:
            typer.echo("error: out of memory; use fewer keypoints, a coarser grid or another interpolator", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


@app.callback()
def _root() -> None:
    """Keypoint-based brain-shift compensation: sparse keypoints -> dense displacement field."""


@app.command()
def version() -> None:
    """Print the brainshift version."""
    from brainshift import __version__

    typer.echo(__version__)


# --- commands registered from their modules (each module imports its heavy dependencies lazily) ---


def main() -> None:  # console-script entry point
    """Entry point of the ``brainshift`` console script."""
    app(prog_name="brainshift")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
