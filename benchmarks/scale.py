"""Scale (issue 16): pipelined shards, encoder threads, codecs, reads, linear operators.

Every comparison is side by side: interleaved rounds, medians, ratios.

1. pipeline: one shard of a 20,000-column float32 MLP Jacobian through
   ``worker.compute_shard`` with ``--cpus-per-shard 2`` (2 torch threads, 1
   encoder), pipelined vs serial; target ``seconds / max(compute, write) <= 1.15``.
2. write path alone: ``PartWriter`` with 1 vs 2 encoder threads (target 1.7x).
3. codecs: zstd levels, lz4, none (BYTE_STREAM_SPLIT) on a dense MLP, a
   per-sample CNN and a sparse heat Jacobian: size, write and read MB/s.
4. reads: ``read_jacobian(verify=False)`` and ``iter_blocks`` vs raw
   ``pq.read_table`` + ``to_numpy`` (target 0.9x); raw pyarrow on the same
   rows with non-nullable list elements (the schema-change question).
5. linear operator: matvec / rmatvec throughput vs the read throughput (0.8x).
6. per-sample overhead: a 6-joint planar chain, ``engine.batched_rows`` vs
   ``vmap(jacrev)``.

    python -m benchmarks.scale            # shard 2,000 x 20,000 (a 20,000 x 20,000 run's shard)
    python -m benchmarks.scale --quick    # 500 x 4,000
    python -m benchmarks.scale --huge --dir /big   # 100,000 x 100,000 under 1 GiB (40 GB disk)
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    Report,
    Target,
    interleaved,
    median,
    paired_speed,
    parser,
    quartiles,
)

PIPELINE_TARGET = 1.15
ENCODER_TARGET = 1.7
READ_TARGET = 0.9
OPERATOR_TARGET = 0.8


def _spec(out: Path, job: str, params: dict[str, Any], rows: int, **extra: Any) -> Any:
    from pipeline.core import ShardSpec
    from pipeline.problem import build_problem, fingerprint, validate
    from pipeline.runner.plan import group_rows

    problem = build_problem(job, params)
    shapes = validate(problem)
    kw: dict[str, Any] = dict(
        job=job, params=params, fingerprint=fingerprint(problem, shapes), shapes=shapes,
        index=0, start=0, stop=rows, out=str(out), method="rev", layout="dense",
        memory_budget=4 * 2**30, threads=2, device="cpu", device_param=False, run_id="bench",
        group_rows=group_rows(shapes.n, shapes.itemsize),
    )
    kw.update(extra)
    return ShardSpec(**kw)


def bench_pipeline(report: Report, root: Path, n: int, rows: int, repeats: int) -> None:
    """Pipelined vs serial shards (compute_shard, no Ray): wall and busy times."""
    from pipeline.runner import compute_shard

    out = root / "pipe"
    out.mkdir()
    spec = _spec(out, "mlp", {"n": n, "m": n, "hidden": 512}, rows)
    results: dict[str, list[Any]] = {"pipelined": [], "serial": []}
    methods = {
        "pipelined": lambda: compute_shard(spec),
        "serial": lambda: compute_shard(spec, pipelined=False),
    }
    wall = interleaved(methods, repeats=repeats, after=lambda k, r: results[k].append(r))
    rows_out = []
    for name, rs in results.items():
        sec = median([r.seconds for r in rs])
        comp = median([r.compute_seconds for r in rs])
        write = median([r.write_seconds for r in rs])
        rows_out.append([name, f"{sec:.2f}", f"{comp:.2f}", f"{write:.2f}",
                         f"{sec / max(comp, write):.2f}", f"{rows / sec:,.0f}"])
    report.table(
        f"One shard {rows:,} x {n:,} float32 (mlp), cpus-per-shard 2, median of {repeats}",
        ["writer", "shard s", "compute s", "write s", "s / max(compute, write)", "rows/s"],
        rows_out)
    piped = results["pipelined"]
    ratio = median([r.seconds / max(r.compute_seconds, r.write_seconds) for r in piped])
    report.target(Target("pipelined shard seconds / max(compute, write)", ratio,
                         PIPELINE_TARGET, higher_is_better=False))
    report.facts["pipeline"] = {"wall_s": wall, "serial_over_pipelined":
                                median(wall["serial"]) / median(wall["pipelined"])}


def _write_part(root: Path, name: str, data: Any, *, compression: str = "zstd",
                encoders: int = 1, sparse: Any = None) -> Any:
    from pipeline.runner.plan import group_rows
    from pipeline.store import PartWriter, Storage, dense_schema, sparse_schema

    if sparse is not None:
        w = PartWriter(Storage(str(root)), name, sparse_schema("float64"), {},
                       group_rows=4096, compression=compression, encoders=encoders)
        w.write_sparse(range(sparse.shape[0]), sparse.indptr, sparse.indices, sparse.data)
        return w.commit()
    rows, n = data.shape
    group = group_rows(n, data.itemsize)
    w = PartWriter(Storage(str(root)), name, dense_schema(n, str(data.dtype)), {},
                   group_rows=group, compression=compression, encoders=encoders)
    for a in range(0, rows, group):
        w.write(a, data[a : a + group])
    return w.commit()


def bench_encoders(report: Report, root: Path, data: Any, repeats: int) -> None:
    """The write path alone: one vs two encoder threads, same bytes."""
    mb = data.nbytes / 1e6
    sums: dict[str, str] = {}
    counts = (1, 2, 4) if (os.cpu_count() or 1) >= 6 else (1, 2)
    methods = {f"{k} encoder thread(s)": (lambda k=k: _write_part(root, f"enc{k}.parquet", data,
                                                                  encoders=k)) for k in counts}
    wall = interleaved(methods, repeats=repeats,
                       after=lambda name, info: sums.__setitem__(name, info.checksum))
    base = median(wall["1 encoder thread(s)"])
    report.table(f"PartWriter alone, {data.shape[0]:,} x {data.shape[1]:,} float32, zstd",
                 ["writer", "median s", "MB/s", "speed-up"],
                 [[k, f"{median(v):.2f}", f"{mb / median(v):,.0f}", f"{base / median(v):.2f}x"]
                  for k, v in wall.items()])
    report.target(Target("write path, 2 vs 1 encoder threads", base /
                         median(wall["2 encoder thread(s)"]), ENCODER_TARGET,
                         note=f"os.cpu_count()={os.cpu_count()}, shared machine"))
    report.facts["encoders"] = {"wall_s": wall, "bitwise_equal": len(set(sums.values())) == 1}


def _datasets(quick: bool) -> dict[str, Any]:
    """Real Jacobians: dense mlp, per-sample cnn (batched), sparse heat (CSR)."""
    import scipy.sparse as sp
    import torch

    from pipeline.maths import batched_rows, jacobian_rows
    from pipeline.problem import build_problem

    torch.set_num_threads(2)
    n, rows = (4000, 300) if quick else (20_000, 600)
    mlp = build_problem("mlp", {"n": n, "m": n, "hidden": 512})
    cnn = build_problem("cnn", {"batch": 8 if quick else 32})
    heat = build_problem("heat", {"N": 48 if quick else 128})
    dense_heat = jacobian_rows(heat.fn, heat.x, 0, heat.x.numel(), chunk_size=1024)
    return {
        "mlp (dense)": jacobian_rows(mlp.fn, mlp.x, 0, rows, chunk_size=256).numpy(),
        "cnn (per-sample)": batched_rows(cnn.fn, cnn.x, 0, cnn.x.shape[0] * 10,
                                         chunk_size=64).numpy(),
        "heat (sparse)": sp.csr_matrix(dense_heat.double().numpy()),
    }


def _read_values(path: Path) -> Any:
    import pyarrow.parquet as pq

    return pq.read_table(path).column("values").combine_chunks().flatten().to_numpy()


def bench_codecs(report: Report, root: Path, quick: bool, repeats: int) -> None:
    """Size, write and read speed of each codec on each kind of Jacobian."""
    import functools

    codecs = ["zstd:1", "zstd:3", "zstd:6", "lz4", "none"]
    table, facts = [], {}
    for label, data in _datasets(quick).items():
        sparse = data if hasattr(data, "indptr") else None
        mb = (data.data.nbytes + data.indices.nbytes if sparse is not None else data.nbytes) / 1e6
        files = {c: f"{label.split()[0]}-{c.replace(':', '')}.parquet" for c in codecs}
        writes = {c: functools.partial(_write_part, root, files[c], data, compression=c,
                                       sparse=sparse) for c in codecs}
        wt = interleaved(writes, repeats=repeats)
        reads = {c: functools.partial(_read_values, root / files[c]) for c in codecs}
        rt = interleaved(reads, repeats=repeats)
        for c in codecs:
            size = os.path.getsize(root / files[c])
            table.append([label, c, f"{mb:,.0f}", f"{size / 1e6:,.1f}", f"{mb * 1e6 / size:.2f}",
                          f"{mb / median(wt[c]):,.0f}", f"{mb / median(rt[c]):,.0f}"])
            facts[f"{label}/{c}"] = {"bytes": size, "write_s": wt[c], "read_s": rt[c]}
    report.table(f"Codecs (BYTE_STREAM_SPLIT, 1 encoder thread), median of {repeats}",
                 ["Jacobian", "codec", "raw MB", "file MB", "ratio", "write MB/s", "read MB/s"],
                 table)
    report.facts["codecs"] = facts


def bench_reads(report: Report, root: Path, data: Any, repeats: int) -> Path:
    """read_jacobian / iter_blocks vs raw pyarrow; raw pyarrow on the old (nullable) schema."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.core import Shapes
    from pipeline.store import Manifest, Storage, open_jacobian, read_jacobian

    rows, n = data.shape
    out = root / "result"
    out.mkdir()
    info = _write_part(out, "part-00000.parquet", data)
    shapes = Shapes("jacobian", (n,), (rows,), None, "float32")
    Manifest.from_json({
        "format_version": 1, "kind": "jacobian", "shapes": shapes.to_json(), "dtype": "float32",
        "plan": [[0, rows]], "status": "complete",
        "shards": [{"index": 0, "start": 0, "stop": rows, "file": info.file, "rows": rows,
                    "checksum": info.checksum, "bytes": info.bytes}],
    }).write(Storage(str(out)))
    # The same rows as parts were written before issue 16 (nullable list elements).
    table = pq.read_table(out / info.file)
    values = pa.FixedSizeListArray.from_arrays(
        table.column("values").combine_chunks().flatten(), n)
    nn = pa.table({"row": table.column("row"), "values": values})
    pq.write_table(nn, root / "nullable.parquet", row_group_size=pq.ParquetFile(
        out / info.file).metadata.row_group(0).num_rows, compression="zstd",
        use_dictionary=False, write_statistics=["row"],
        column_encoding={"row": "PLAIN", "values.list.element": "BYTE_STREAM_SPLIT"})
    del table, values, nn

    def raw(path: Path) -> Any:
        col = pq.read_table(path).column("values").combine_chunks()
        return col.flatten().to_numpy().reshape(-1, n)

    def blocks() -> int:
        return sum(len(b) for _, b in open_jacobian(out).iter_blocks(verify=False))

    assert np.array_equal(read_jacobian(out, verify=False), data)
    assert np.array_equal(raw(root / "nullable.parquet"), data)
    methods = {
        "pq.read_table + to_numpy": lambda: raw(out / info.file),
        "pq.read_table, nullable elements (before)": lambda: raw(root / "nullable.parquet"),
        "read_jacobian(verify=False)": lambda: read_jacobian(out, verify=False),
        "read_jacobian (sha256)": lambda: read_jacobian(out),
        "iter_blocks(verify=False)": blocks,
    }
    wall = interleaved(methods, repeats=repeats)
    mb = data.nbytes / 1e6
    base = median(wall["pq.read_table + to_numpy"])
    report.table(f"Full read of {rows:,} x {n:,} float32 ({mb:,.0f} MB), median of {repeats}",
                 ["reader", "median s", "MB/s", "vs raw pyarrow"],
                 [[k, f"{median(v):.3f}", f"{mb / median(v):,.0f}", f"{base / median(v):.2f}x"]
                  for k, v in wall.items()])
    report.target(Target("read_jacobian(verify=False) / raw pq.read_table", base /
                         median(wall["read_jacobian(verify=False)"]), READ_TARGET))
    report.target(Target("iter_blocks(verify=False) / raw pq.read_table", base /
                         median(wall["iter_blocks(verify=False)"]), READ_TARGET))
    report.facts["reads"] = {"wall_s": wall}
    return out


def bench_operator(report: Report, out: Path, repeats: int) -> None:
    """matvec / rmatvec / matmat(8) over the streamed parts vs reading the same rows."""
    import numpy as np

    from pipeline.store import open_jacobian, read_jacobian

    op = open_jacobian(out).as_linear_operator()
    m, n = op.shape
    rng = np.random.default_rng(0)
    v, u, V = rng.standard_normal(n), rng.standard_normal(m), rng.standard_normal((n, 8))
    methods = {
        "read_jacobian(verify=False)": lambda: read_jacobian(out, verify=False),
        "matvec": lambda: op.matvec(v),
        "rmatvec": lambda: op.rmatvec(u),
        "matmat (8 columns)": lambda: op.matmat(V),
    }
    wall = interleaved(methods, repeats=repeats)
    base = median(wall["read_jacobian(verify=False)"])
    mb = m * n * 4 / 1e6
    report.table(f"Linear operator over {m:,} x {n:,} float32, median of {repeats}",
                 ["product", "median s", "MB/s of J", "vs read"],
                 [[k, f"{median(t):.3f}", f"{mb / median(t):,.0f}", f"{base / median(t):.2f}x"]
                  for k, t in wall.items()])
    for k in ("matvec", "rmatvec"):
        report.target(Target(f"{k} throughput / read throughput", base / median(wall[k]),
                             OPERATOR_TARGET))
    report.facts["operator"] = {"wall_s": wall}


def chain(q: Any) -> Any:
    """A 6-joint planar chain: end point (x, y) and tool angle from joint angles ``q`` (6,)."""
    import torch

    lengths = torch.tensor([0.5, 0.4, 0.3, 0.25, 0.2, 0.1], dtype=q.dtype)
    c = torch.cumsum(q, -1)
    return torch.stack([(lengths * torch.cos(c)).sum(-1), (lengths * torch.sin(c)).sum(-1),
                        c[..., -1]])


def bench_chain(report: Report, quick: bool, repeats: int) -> None:
    """engine.batched_rows vs vmap(jacrev) on the chain (float64, 2 threads).

    Millisecond calls on a shared machine drift by several percent between
    rounds, so the speeds are medians of per-round ratios (shuffled order),
    and ``vmap(jacrev)`` is also timed against itself: that row's spread is
    the noise band of every other ratio.
    """
    import torch

    from pipeline.maths import engine

    torch.set_num_threads(2)
    rows, facts = [], {}
    base = "vmap(jacrev)"
    for b in (5000,) if quick else (5000, 100_000):
        xs = torch.randn(b, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        flat = engine._flat_fn(chain, xs.shape[1:])
        methods = {
            base: lambda xs=xs: torch.func.vmap(torch.func.jacrev(chain))(xs),
            "vmap(jacrev) again (noise band)": lambda xs=xs: torch.func.vmap(
                torch.func.jacrev(chain))(xs),
            "engine.batched_rows": lambda xs=xs, b=b: engine.batched_rows(chain, xs, 0, 3 * b),
            "iter_batched_rows(m=3), the worker's call": lambda xs=xs, b=b: list(
                engine.iter_batched_rows(chain, xs, 0, 3 * b, m=3)),
            "one forward f(xs[0]) (what learning m cost)": lambda xs=xs, f=flat: f(xs[0]),
        }
        rounds = max(repeats, 101 if b <= 10_000 else 31)
        wall = interleaved(methods, repeats=rounds, warmup=3, shuffle=True)
        for k, t in wall.items():
            lo, hi = quartiles([a / c for a, c in zip(wall[base], t, strict=True)])
            rows.append([f"{b:,}", k, f"{median(t) * 1e3:.3f}",
                         f"{paired_speed(wall, base, k):.3f}x", f"{lo:.2f}-{hi:.2f}"])
        report.target(Target(f"per-sample chain B={b:,}: engine.batched_rows speed vs "
                             "vmap(jacrev) (median paired ratio)",
                             paired_speed(wall, base, "engine.batched_rows"), 1.0,
                             note=f"A/A: {paired_speed(wall, base, list(methods)[1]):.3f}x"))
        facts[b] = wall
    report.table("Per-sample 6-joint chain (3 x 6 per sample, float64, 2 threads), "
                 "medians of per-round ratios, shuffled rounds",
                 ["B", "method", "median ms", "speed vs vmap(jacrev)", "quartiles"], rows)
    report.facts["chain"] = facts


_AFTER_RUN = """
import json, resource, sys, time
import numpy as np
from scipy.sparse.linalg import lsmr
from pipeline.analysis.inspection import svd_result
from pipeline import open_jacobian
out = sys.argv[1]
t0 = time.perf_counter()
svd = svd_result(out, 10)
t1 = time.perf_counter()
op = open_jacobian(out).as_linear_operator()
r = np.random.default_rng(0).standard_normal(op.shape[0]).astype(np.float32)
step = lsmr(op, -r, maxiter=1)[0]
t2 = time.perf_counter()
print(json.dumps({"svd_s": t1 - t0, "singular_values": [float(v) for v in svd.s],
                  "lsmr_1_iteration_s": t2 - t1, "step_norm": float(np.linalg.norm(step)),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def huge(args: Any) -> int:
    """100,000 x 100,000 float32 (40 GB) under ``--memory-budget 1GiB``, then svd 10 and lsmr.

    Every process is measured: the shard tasks (their ``peak_rss`` in the
    manifest), the driver (``RUSAGE_CHILDREN`` of the ``jacpipe run``
    process), and the svd/lsmr process; the target is 1.2 GiB each. Needs
    ~40 GB free under ``--dir`` and hours on a few cores; not run in the test suite.
    """
    import json
    import resource
    import subprocess

    from pipeline.store import open_jacobian

    root = Path(args.dir or tempfile.mkdtemp(prefix="jacpipe-huge-"))
    out = root / "huge"
    size = 4_000 if args.quick else 100_000
    run = [sys.executable, "-c", "from pipeline.cli import main; main()", "run", "mlp",
           "-p", f"n={size}", "-p", f"m={size}", "-p", "hidden=256", "--out", str(out),
           "--memory-budget", "1GiB", "--cpus-per-shard", "2", "--rows-per-shard", "5000",
           "--no-progress"]
    t0 = time.perf_counter()
    subprocess.run(run, check=True)
    run_s = time.perf_counter() - t0
    driver_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    shards = open_jacobian(out).manifest.to_json()["shards"]
    after = subprocess.run([sys.executable, "-c", _AFTER_RUN, str(out)], check=True,
                           capture_output=True, text=True)
    facts = json.loads(after.stdout.strip().splitlines()[-1])
    peaks = {"driver": driver_rss, "shard task (max)": max(s["peak_rss"] or 0 for s in shards),
             "svd + lsmr": facts["peak_rss"]}
    report = Report("scale-huge", quick=args.quick)
    report.table(f"{size:,} x {size:,} float32 under --memory-budget 1GiB",
                 ["process", "peak RSS GiB"], [[k, f"{v / 2**30:.2f}"] for k, v in peaks.items()])
    for k, v in peaks.items():
        report.target(Target(f"peak RSS of {k}", v / 2**30, 1.2, higher_is_better=False,
                             unit=" GiB"))
    report.facts = {"run_s": run_s, "bytes": sum(s["bytes"] for s in shards), **facts,
                    "peaks": peaks}
    report.finish(args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the scale benchmark (see the module docstring); ``--huge`` runs the 40 GB case."""
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp dir in /tmp)")
    p.add_argument("--huge", action="store_true",
                   help="100,000 x 100,000 float32 under --memory-budget 1GiB, then svd, lsmr")
    p.add_argument("--only", default="pipeline,encoders,codecs,reads,operator,chain")
    args = p.parse_args(argv)
    if args.huge:
        return huge(args)
    import numpy as np

    repeats = max(3, args.repeats or 3)
    n, rows = (4000, 500) if args.quick else (20_000, 2000)
    only = set(args.only.split(","))
    report = Report("scale", quick=args.quick)
    report.facts["sizes"] = {"n": n, "shard_rows": rows}
    root = Path(tempfile.mkdtemp(prefix="jacpipe-scale-", dir=args.dir or "/tmp"))
    try:
        if "pipeline" in only:
            bench_pipeline(report, root, n, rows, repeats)
        from benchmarks.parquet_io import jacobian_block

        data = np.ascontiguousarray(jacobian_block(rows // 2, n))
        if "encoders" in only:
            bench_encoders(report, root, data, repeats)
        if "codecs" in only:
            bench_codecs(report, root, args.quick, repeats)
        if "reads" in only or "operator" in only:
            out = bench_reads(report, root, data, repeats)
            if "operator" in only:
                bench_operator(report, out, repeats)
        if "chain" in only:
            bench_chain(report, args.quick, repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report.facts["finished"] = time.time()
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
