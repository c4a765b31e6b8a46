"""Timing, targets, tables and result files shared by the benchmarks.

Every benchmark times the compared methods *interleaved* (one repeat of each,
then the next round), so a noisy neighbour on a shared machine hits all of them
alike, and reports medians and the ratios of medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--quick``, ``--repeats``, ``--json``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, a fast smoke run")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (at least 3)")
    p.add_argument("--json", type=Path, default=None,
                   help="result file (default: benchmarks/results/NAME.json)")
    return p


def interleaved(
    methods: dict[str, Callable[[], Any]],
    *,
    repeats: int,
    warmup: int = 1,
    after: Callable[[str, Any], None] | None = None,
    shuffle: bool = False,
) -> dict[str, list[float]]:
    """Wall seconds of each method, ``repeats`` interleaved rounds after ``warmup`` ones.

    Args:
        methods: name -> a call doing the whole work once.
        repeats: timed rounds; every method runs once per round.
        warmup: untimed rounds first (imports, allocator, lazy init).
        after: called with ``(name, result)`` after each timed call, outside the timing.
        shuffle: a new (seeded) order of the methods each round: no method
            always runs after the same one (millisecond calls feel the
            allocator and cache state their predecessor leaves).
    """
    for _ in range(warmup):
        for fn in methods.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    rng = random.Random(0)
    for _ in range(repeats):
        order = list(methods.items())
        if shuffle:
            rng.shuffle(order)
        for name, fn in order:
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            if after is not None:
                after(name, out)
            del out
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def paired_speed(times: Mapping[str, Sequence[float]], base: str, name: str) -> float:
    """Median over rounds of ``base / name`` (speed of ``name``): drifts of the machine cancel."""
    return median([b / t for b, t in zip(times[base], times[name], strict=True)])


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles: the spread of a paired ratio."""
    q = statistics.quantiles(xs, n=4)
    return float(q[0]), float(q[2])


@dataclass
class Target:
    """One target of the issue: ``value`` compared with ``threshold``."""

    name: str
    value: float
    threshold: float
    higher_is_better: bool = True
    unit: str = "x"
    note: str = ""

    @property
    def met(self) -> bool:
        if self.higher_is_better:
            return self.value >= self.threshold
        return self.value <= self.threshold

    def line(self) -> str:
        op = ">=" if self.higher_is_better else "<="
        status = "MET" if self.met else "MISSED"
        extra = f"  ({self.note})" if self.note else ""
        return (f"  {status:6s}  {self.name}: {self.value:.3g}{self.unit} "
                f"(target {op} {self.threshold:g}{self.unit}){extra}")


@dataclass
class Report:
    """What one benchmark prints and writes to ``results/NAME.json``."""

    name: str
    quick: bool
    tables: list[dict[str, Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def table(self, title: str, headers: list[str], rows: list[list[Any]]) -> None:
        self.tables.append({"title": title, "headers": headers, "rows": rows})
        print(f"\n### {title}\n")
        print(markdown_table(headers, rows))

    def target(self, target: Target) -> None:
        self.targets.append(target)

    def finish(self, path: Path | None = None) -> Path:
        """Print the targets and write the JSON result; returns its path."""
        print("\ntargets" + (" (quick mode: reduced sizes, indicative only)" if self.quick else ""))
        for t in self.targets:
            print(t.line())
        path = path or RESULTS / f"{self.name}{'-quick' if self.quick else ''}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "benchmark": self.name,
            "quick": self.quick,
            "machine": machine(),
            "seconds": round(time.time() - self.started, 1),
            "tables": self.tables,
            "targets": [dict(asdict(t), met=t.met) for t in self.targets],
            "facts": self.facts,
        }
        path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        print(f"\nwrote {path}")
        return path


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """``rows`` (cells of any type, formatted by ``_fmt``) as a Markdown table.

    An empty ``rows`` gives the header and separator lines alone.
    """
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
            for r in cells]
    return "\n".join([line, sep, *body])


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 1:
            return f"{x:.2f}"
        return f"{x:.3g}"
    return str(x)


def machine() -> dict[str, Any]:
    """The facts a reader needs to compare numbers across machines."""
    import torch

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg": load,
    }


def seconds(x: float) -> str:
    """Seconds as a short string for tables (ms below one second)."""
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.2f} s"


def gib(nbytes: float) -> float:
    return nbytes / 2**30
