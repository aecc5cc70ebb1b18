"""The typer app of the ``brainshift`` command line, its error handling and the ``version`` command.

Each command parses options and calls one library function; heavy modules (torch, SimpleITK, scipy) are
imported inside the commands so ``brainshift --help`` is instant. Any :class:`BrainshiftError` (bad input)
is printed as one line ``error: ...`` on stderr with exit code 2, never a traceback. Usage errors (an unknown
option, a bad value, a missing argument) are one line too (:class:`OneLineErrorsGroup`, not click's box), and
an error never continues a progress bar's line (:func:`error_line`). ``--help`` is click's plain layout
(``rich_markup_mode=None``): typer's rich panels cut long option names at 80 columns and showed a ``<bool>``
type on every flag; the plain layout wraps the help text under the full option names, at the terminal's width
(80 when piped), and lists each command with its first sentence in full.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click as typer._click; older ones use click itself
    from typer._click import exceptions as _click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exceptions

from brainshift.errors import BrainshiftError


def one_line(text: str) -> str:
    """``text`` with its lines joined by spaces (a library message spanning lines becomes one line)."""
    return " ".join(ln.strip() for ln in str(text).splitlines() if ln.strip())


def error_line(message: str) -> None:
    """Print ``error: message`` as one line on stderr, after ending any progress bar still on screen."""
    _end_progress_bars()
    typer.echo(f"error: {one_line(message)}", err=True)


def _end_progress_bars() -> None:
    """Close active tqdm bars so that the next line starts on a line of its own."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


_INTERRUPTED = "interrupted; nothing was written (outputs appear only when a run completes)"


class OneLineErrorsGroup(TyperGroup):
    """The command group: usage errors as one ``error:`` line (exit 2) instead of click's multi-line box."""

    def format_commands(self, ctx, formatter) -> None:
        """The command list of ``brainshift --help``: each command's first sentence in full, wrapped (click cuts
        it to the width left on its line, ending in "...")."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=sys.maxsize)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click_exceptions.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help() if exc.ctx is not None else str(exc), err=True)
            sys.exit(2)
        except _click_exceptions.UsageError as exc:
            cmd = exc.ctx.command_path if exc.ctx is not None else (prog_name or "brainshift")
            error_line(f"{exc.format_message()} (see {cmd} --help)")
            sys.exit(2)
        except _click_exceptions.ClickException as exc:
            error_line(exc.format_message())
            sys.exit(exc.exit_code)
        except (typer.Abort, KeyboardInterrupt):
            error_line(_INTERRUPTED)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineErrorsGroup,
    name="brainshift",
    help="Keypoint-based brain-shift compensation: sparse keypoints -> dense displacement field.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click help: full option names and no <bool> on flags at 80 columns
)


def choice(value: str | None) -> str | None:
    """A choice option's value as the library spells its choices: stripped, lower case (None stays None).

    Every choice option of the command line (``-m``, ``-f``, ``--coords``, ``--frame``, ``-d``, ``--h5-dtype``,
    ``--material``, ``--methods``, ``--tps-lam cv``) goes through it, so that ``-m TPS`` is accepted as ``-f NII``
    always was; the library then validates the value and names the choices.
    """
    return value.strip().lower() if isinstance(value, str) else value


def cli_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for commands: bad input becomes a one-line ``error:`` message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BrainshiftError as exc:
            error_line(str(exc))
            raise typer.Exit(code=2) from None
        except OSError as exc:  # missing files, a file where a folder is expected, permissions, full disk
            where = f" {exc.filename!s}" if exc.filename else ""
            error_line(f"expected a readable input / writable output path, got{where}: {exc.strerror or exc}")
            raise typer.Exit(code=2) from None
        except MemoryError:
            error_line("out of memory; use fewer keypoints, a coarser grid or another interpolator")
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            error_line(_INTERRUPTED)
            raise typer.Exit(code=130) from None

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
