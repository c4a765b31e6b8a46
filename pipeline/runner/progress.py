"""Progress of a run: a bar on a terminal, one line per shard otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from pipeline.core.shard import ShardResult


class Progress:
    """A rich progress bar (shards, rows/s, ETA) or plain lines when not a terminal."""

    def __init__(self, shards: int, *, enabled: bool, echo: Callable[[str], None]) -> None:
        self.shards, self.enabled, self.echo = shards, enabled, echo
        self.done_shards = 0
        self.done_rows = 0
        self._bar: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()
        self._last_line = 0.0

    def __enter__(self) -> Progress:
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]shards"),
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
                "run", total=self.shards, completed=self.done_shards, rate="-"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def advance(self, result: ShardResult) -> None:
        self.done_shards += 1
        self.done_rows += result.rows
        rate = self.done_rows / max(time.perf_counter() - self._t0, 1e-9)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done_shards, rate=f"{rate:,.0f}")
        elif self.enabled:
            now = time.perf_counter()
            if now - self._last_line > 5 or self.done_shards == self.shards:
                self._last_line = now
                self.echo(
                    f"shards {self.done_shards}/{self.shards}  {rate:,.0f} rows/s  "
                    f"elapsed {now - self._t0:.1f}s"
                )
