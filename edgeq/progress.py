"""Progress on long steps (calibration, conversion, analysis, uploads, runs), on stderr.

Silent with --quiet or when stderr is not a terminal, so `--json` stdout stays one document and
logs stay clean in CI. Library functions take a `Progress` (default: silent).
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


class Progress:
    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Yields `advance(n=1)`. A bar when total is known, else a spinner."""
        if not self.enabled:
            yield lambda n=1: None
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, SpinnerColumn,
                                   TextColumn, TimeElapsedColumn)
        from rich.console import Console

        cols = [SpinnerColumn(), TextColumn("{task.description}")]
        if total:
            cols += [BarColumn(), MofNCompleteColumn()]
        cols.append(TimeElapsedColumn())
        # A private copy of stderr: converter work silences fd 2 (quiet.quiet_native), not the bar.
        with os.fdopen(os.dup(2), "w") as err, RichProgress(*cols, console=Console(file=err), transient=True) as p:
            tid = p.add_task(description, total=total)
            yield lambda n=1: p.advance(tid, n)

    def iter(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        with self.task(description, total) as advance:
            for item in items:
                yield item
                advance(1)

    def note(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr)


SILENT = Progress(False)
