"""Committed bytes per second of each Parquet codec and ``--compression auto`` vs the disk's rate.

Each codec writes the same rows through ``PartWriter`` as a worker does
(encoding pieces on the host's threads, sha256, ``fsync``, rename) into a
folder on the disk under test, and the disk's sequential write rate is
measured in the same rounds (:func:`pipeline.store.throughput.disk_rate`, a
64 MiB probe with ``fsync``). Two data sets:

* random-looking float32 (the issue's 8192 x 8192 GPU case, scaled down to
  fit this machine: 2048 x 8192, 64 MiB; the rows of a dense MLP Jacobian
  look like this to a codec);
* structured float32: a banded matrix stored dense (7 nonzeros a row), the
  rows of a stencil Jacobian written without the sparse layout.

``auto`` is the codec :func:`pipeline.store.throughput.auto_codec` chooses
once for the schema in this folder, before any data exists, as a run does
(its probe's seconds are reported apart); both data sets are written with
that one choice. Interleaved rounds; medians, and
the median over rounds of committed rate / that round's disk rate.

    python -m benchmarks.codecs [--dir /path/on/the/disk] [--quick]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import Report, Target, interleaved, median, parser, seconds

#: The issue's target for GPU runs: committed bytes/s over the disk's write rate.
DISK_TARGET = 0.8


def datasets(rows: int, n: int) -> dict[str, Any]:
    """The two data sets: random-looking and banded float32, ``rows`` x ``n``."""
    import numpy as np

    rng = np.random.default_rng(0)
    band = np.zeros((rows, n), np.float32)
    for k in range(-3, 4):
        i = np.arange(max(0, -k), min(rows, n - k))
        band[i, i + k] = rng.standard_normal(len(i)).astype(np.float32)
    return {"random-looking": rng.standard_normal((rows, n), dtype=np.float32),
            "structured (banded)": band}


def write_part(folder: Path, data: Any, codec: str, threads: int) -> int:
    """One part written as a worker writes it; returns its bytes on disk."""
    from pipeline.store import PartWriter, Storage, dense_schema

    rows, n = data.shape
    writer = PartWriter(Storage(str(folder)), "part-00000.parquet", dense_schema(n, "float32"), {},
                        group_rows=max(1, 32 * 2**20 // (4 * n)), compression=codec,
                        encoders=threads)
    block = max(1, 8 * 2**20 // (4 * n))
    for a in range(0, rows, block):
        writer.write(a, data[a:a + block])
    return writer.commit().bytes


def measure(name: str, data: Any, root: Path, threads: int, repeats: int) -> dict[str, Any]:
    """Interleaved rounds of every codec and the disk probe on one data set."""
    from pipeline.core.codec import CODECS
    from pipeline.store import Storage
    from pipeline.store.throughput import disk_rate

    folder = root / name.split()[0]
    folder.mkdir()
    sizes: dict[str, int] = {}
    disks: list[float] = []

    def writer(codec: str) -> Any:
        return lambda: sizes.__setitem__(codec, write_part(folder, data, codec, threads))

    methods = {codec: writer(codec) for codec in CODECS}
    methods["disk probe"] = lambda: disks.append(
        disk_rate(Storage(str(folder)), cached=False) or float("nan"))
    times = interleaved(methods, repeats=repeats)
    disks = disks[-repeats:]  # the timed rounds' (the warm-up's first)
    rates = {c: [data.nbytes / t for t in times[c]] for c in CODECS}
    return {"sizes": sizes, "disk": disks,
            "rates": rates, "times": times}


def main(argv: list[str] | None = None) -> int:
    from pipeline.store import Storage, dense_schema
    from pipeline.store.throughput import auto_codec, host_threads

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dir", default=None,
                   help="a folder on the disk to measure (default: out/ in the repo, where "
                   "a run's default --out goes)")
    p.add_argument("--threads", type=int, default=None,
                   help="encoder threads [default: the host's CPUs]")
    args = p.parse_args(argv)
    rows, n = (512, 4096) if args.quick else (2048, 8192)
    repeats = max(3, args.repeats or 5)
    threads = args.threads or host_threads()
    report = Report("codecs", quick=args.quick)
    base = args.dir or str(Path(__file__).resolve().parents[1] / "out")
    Path(base).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="codecs-", dir=base))
    results = {}
    try:
        t0 = time.perf_counter()
        choice = auto_codec(Storage(str(root)), dense_schema(n, "float32"), threads=threads)
        probe_s = time.perf_counter() - t0
        print(choice.line(), f"[probe {probe_s:.2f} s]", flush=True)
        for name, data in datasets(rows, n).items():
            results[name] = dict(measure(name, data, root, threads, repeats), choice=choice,
                                 probe_s=probe_s)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    facts: dict[str, Any] = {"rows": rows, "n": n, "threads": threads, "dir": base}
    for name, r in results.items():
        _report(report, name, r, rows, n, repeats, threads, facts)
    report.facts = facts
    report.finish(args.json)
    return 0


def _report(report: Report, name: str, r: dict[str, Any], rows: int, n: int, repeats: int,
            threads: int, facts: dict[str, Any]) -> None:
    """One data set's table, targets and facts."""
    disk = median(r["disk"])
    mb = rows * n * 4 / 1e6
    auto = r["choice"].codec
    table = []
    for codec, rates in r["rates"].items():
        paired = median([x / d for x, d in zip(rates, r["disk"], strict=True)])
        table.append([codec + (" (= auto)" if codec == auto else ""),
                      seconds(median(r["times"][codec])), f"{median(rates) / 1e6:,.0f}",
                      f"{r['sizes'][codec] / 1e6:,.1f}", f"{paired:.2f}"])
    table.append(["disk probe (64 MiB, fsync)", "", f"{disk / 1e6:,.0f}", "", "1.00"])
    report.table(
        f"{name}: {rows:,} x {n:,} float32 ({mb:,.0f} MB) committed by PartWriter on "
        f"{threads} encoder thread(s), median of {repeats}; auto chose {auto} "
        f"(probe {r['probe_s']:.2f} s)",
        ["codec", "median", "committed MB/s", "file MB", "committed / disk rate"], table)
    best = max(r["rates"], key=lambda c: median(r["rates"][c]))
    auto_rate, zstd_rate = median(r["rates"][auto]), median(r["rates"]["zstd"])
    report.target(Target(f"{name}: auto ({auto}) committed / disk rate",
                         median([x / d for x, d in zip(r["rates"][auto], r["disk"],
                                                       strict=True)]), DISK_TARGET))
    report.target(Target(f"{name}: auto ({auto}) / fastest codec ({best})",
                         auto_rate / median(r["rates"][best]), 0.9))
    report.target(Target(f"{name}: auto ({auto}) / zstd (the default)", auto_rate / zstd_rate,
                         1.0, note=f"file {r['sizes'][auto] / max(r['sizes']['zstd'], 1):.2f}x "
                         "zstd's"))
    facts[name] = {"auto": r["choice"].to_json(), "probe_s": r["probe_s"],
                   "disk_bytes_per_s": r["disk"], "committed_bytes_per_s": r["rates"],
                   "file_bytes": r["sizes"], "write_s": r["times"]}


if __name__ == "__main__":
    sys.exit(main())
