"""Progress reporting: named steps with their wall time, and progress notes (the one mechanism).

A step that takes longer than a second is reported on stderr when it ends (and announced when it starts,
so the user knows what is running); notes (:meth:`StepTimer.note`) are the library's other progress lines.
Both are also DEBUG records of the ``brainshift.progress`` logger, so a library user can route them through
``logging`` instead. Long loops inside a step use tqdm directly.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

#: Every step and note is also a record of this logger (DEBUG), whether or not it is printed.
log = logging.getLogger("brainshift.progress")


class StepTimer:
    """Collects ``{step name: seconds}`` and prints steps as they run when ``verbose``."""

    def __init__(self, verbose: bool = True, stream=None) -> None:
        self.verbose = verbose
        self.stream = stream if stream is not None else sys.stderr
        self.timings_s: dict[str, float] = {}

    def note(self, text: str) -> None:
        """Print a progress line (when verbose): the one way library code reports progress to the user."""
        log.debug("%s", text)
        if self.verbose:
            print(text, file=self.stream, flush=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the body; print ``name ...`` at start and ``name: X.XX s`` at the end when verbose."""
        if self.verbose:
            print(f"  {name} ...", file=self.stream, flush=True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.timings_s[name] = self.timings_s.get(name, 0.0) + dt
            log.debug("%s: %.3f s", name, dt)
            if self.verbose and dt >= 1.0:
                print(f"  {name}: {dt:.2f} s", file=self.stream, flush=True)
