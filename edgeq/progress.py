"""Progress on long steps (calibration, conversion, analysis, uploads, runs), on stderr.

Silent with --quiet or when stderr is not a terminal, so `--json` stdout stays one document and
logs stay clean in CI. EDGEQ_PROGRESS=plain asks for plain lines instead (a CI log, `ssh host edgeq
...` without a terminal: a long --optimize best would otherwise show nothing for minutes); `bar` and
`off` force the other two. Library functions take a `Progress` (default: silent).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")


ENV = "EDGEQ_PROGRESS"
MODES = ("auto", "bar", "plain", "off")
# Plain mode: a bar's count at most this often (seconds), so a log gets a line a step, not a flood.
PLAIN_EVERY = 10.0


def _mode() -> str:
    from .errors import EdgeqError

    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise EdgeqError(f"{ENV}={mode!r}: use one of {', '.join(MODES)}")
    return "bar" if mode == "auto" and sys.stderr.isatty() else ("off" if mode == "auto" else mode)


def _private_stderr():
    """Where plain lines go: a copy of fd 2 made now, as converter work silences fd 2 and sys.stderr
    (quiet.quiet_native); sys.stderr itself where it is not fd 2 (click's test runner)."""
    try:
        if sys.stderr.fileno() == 2:
            return os.fdopen(os.dup(2), "w", buffering=1)
    except (AttributeError, OSError, ValueError):
        pass
    return sys.stderr


class Progress:
    def __init__(self, enabled: bool | None = None):
        self.plain = False
        if enabled is None:
            mode = _mode()
            enabled, self.plain = mode != "off", mode == "plain"
        self.enabled = enabled
        self._out = _private_stderr() if self.plain else None

    @contextlib.contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """Yields `advance(n=1)`. A bar when total is known, else a spinner."""
        if not self.enabled:
            yield lambda n=1: None
            return
        if self.plain:
            with self._plain_task(description, total) as advance:
                yield advance
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

    @contextlib.contextmanager
    def _plain_task(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        t0 = last = time.monotonic()
        done = 0
        self.note(f"{description} ...")

        def advance(n: int = 1) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if total and now - last >= PLAIN_EVERY and done < total:
                last = now
                self.note(f"{description}: {done}/{total} ({now - t0:.0f} s)")

        yield advance  # an error propagates without a "done" line; the error's own line follows
        count = f"{done}/{total}, " if total else ""
        self.note(f"{description}: done ({count}{time.monotonic() - t0:.1f} s)")

    def iter(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        with self.task(description, total) as advance:
            for item in items:
                yield item
                advance(1)

    def note(self, message: str) -> None:
        if self.enabled:
            print(message, file=self._out or sys.stderr, flush=True)


SILENT = Progress(False)
