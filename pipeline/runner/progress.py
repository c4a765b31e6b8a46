"""Progress of a run: a bar on a terminal, plain lines otherwise, and the start-up phases.

NOTE: [Start-up you can see]
    Before the first shard ends a run may spend many seconds starting Ray and
    its workers (each importing torch). On a terminal the bar's spinner turns
    and its label names the phase (``starting Ray``, ``workers ready 1/2``,
    ``detecting sparsity``); elsewhere (make, CI, a log file) each phase is
    one plain line, and a heartbeat line follows whenever HEARTBEAT seconds
    pass without one, so a log never looks frozen.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.core.shard import ShardResult

#: Seconds without a line (stderr not a terminal) before a heartbeat line
#: (checked every HEARTBEAT_POLL seconds: a log is never silent for 10 s).
HEARTBEAT = 8.0
HEARTBEAT_POLL = 0.5


class Progress:
    """A rich progress bar (phase, shards, rows/s, ETA) or plain lines when not a terminal.

    Re-entrant: the driver enters it around Ray's start-up, the scheduler
    again around the shards; the bar (or the heartbeat) lives until the
    outermost exit.
    """

    def __init__(self, shards: int, *, enabled: bool, echo: Callable[[str], None],
                 terminal: bool | None = None) -> None:
        self.shards, self.enabled, self.echo = shards, enabled, echo
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.done_shards = 0
        self.done_rows = 0
        self.label = "shards"
        self._bar: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()
        self._last_line = time.perf_counter()
        self._depth = 0
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Progress:
        self._depth += 1
        if self._depth > 1:
            return self
        if self.enabled and self.terminal:
            self._start_bar()
        elif self.enabled:
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, name="jacpipe-heartbeat",
                                          daemon=True)
            self._beat.start()
        return self

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._bar = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            MofNCompleteColumn(),
            BarColumn(),
            TextColumn("{task.fields[rate]} rows/s"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self._bar.__enter__()
        self._task = self._bar.add_task(
            self.label, total=self.shards, completed=self.done_shards, rate="-"
        )

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=1.0)
            self._beat = None

    def phase(self, text: str) -> None:
        """Name what the run is doing now: the bar's label, else one plain line."""
        self.label = text
        if self._bar is not None:
            self._bar.update(self._task, description=text)
        else:
            self._line(f"{text}...")

    def advance(self, result: ShardResult) -> None:
        """One more shard committed."""
        self.advance_rows(result.rows)

    def advance_rows(self, rows: int) -> None:
        """One more shard of ``rows`` rows done."""
        self.done_shards += 1
        self.done_rows += rows
        self.label = "shards"
        rate = self.done_rows / max(time.perf_counter() - self._t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done_shards, rate=f"{rate:,.0f}",
                             description="shards")
        elif self.enabled:
            now = time.perf_counter()
            if now - self._last_line > 5 or self.done_shards == self.shards:
                self._line(self._status(now, rate))

    def _status(self, now: float, rate: float | None = None) -> str:
        elapsed = now - self._t0
        rate = self.done_rows / max(elapsed, 1e-9) if rate is None else rate
        line = (f"shards {self.done_shards}/{self.shards}  {rate:,.0f} rows/s  "
                f"elapsed {elapsed:.1f}s")
        left = self.shards - self.done_shards
        if self.done_shards and left:
            line += f"  ETA {elapsed / self.done_shards * left:.0f}s"
        return line

    def _line(self, text: str) -> None:
        with self._lock:
            self._last_line = time.perf_counter()
            self.echo(text)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_POLL):
            self.beat(time.perf_counter())

    def beat(self, now: float) -> bool:
        """A status line if HEARTBEAT seconds passed without one at ``now``; whether it was."""
        if now - self._last_line < HEARTBEAT:
            return False
        status = self._status(now)
        self._line(status if self.label == "shards" else f"{self.label}... {status}")
        return True


@contextlib.contextmanager
def slow_phase(echo: Callable[[str], None], text: str, *, enabled: bool = True,
               after: float = 1.0) -> Iterator[None]:
    """One ``text...`` line if the block runs past ``after`` seconds, then a heartbeat.

    For the steps before the shards (building and checking the job, detecting
    sparsity, colouring): silent when quick, visible when not (NOTE: [Start-up
    you can see]); nothing when not ``enabled`` (``--no-progress``).
    """
    if not enabled:
        yield
        return
    done = threading.Event()
    t0 = time.perf_counter()

    def watch() -> None:
        if done.wait(after):
            return
        echo(f"{text}...")
        while not done.wait(HEARTBEAT):
            echo(f"{text}... {time.perf_counter() - t0:.0f}s")

    watcher = threading.Thread(target=watch, name="jacpipe-phase", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(timeout=1.0)
