"""End to end: ``jacpipe run`` on a running Ray vs one process doing jacrev + one Parquet write.

Ray is started first (``ray.init`` with every CPU) and warmed with a small job,
so worker processes have torch imported, as on a live cluster; then, in
interleaved rounds: ``pipeline.run(RunOptions(...))`` of an MLP Jacobian
(default plan, memory budget, method and chunk size: what ``jacpipe run mlp``
does) against ``torch.func.jacrev`` in this process plus one ``pq.write_table``
of the same matrix with the same writer settings (the problem is built outside
the timing for the in-process side only). Medians.

    python -m benchmarks.end_to_end            # mlp 20000 x 20000, hidden 1536 (1.6 GB), ~4 min
    python -m benchmarks.end_to_end --quick    # mlp 3000 x 3000
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import Report, Target, interleaved, median, parser, seconds

TARGET = 1.3


def _threads_in_a_task() -> dict[str, Any]:
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> dict[str, Any]:
        import torch

        return {"torch_threads": torch.get_num_threads(),
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    return ray.get(probe.remote())


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray
    import torch

    from jobs.mlp import build
    from pipeline import RunOptions, run
    from pipeline.runner.plan import group_rows
    from pipeline.store import dense_schema

    p = parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="n = m of the MLP")
    p.add_argument("--hidden", type=int, default=None, help="hidden width (default 1536)")
    p.add_argument("--dir", default=None, help="scratch folder (default: a temp dir in /tmp)")
    args = p.parse_args(argv)
    size = args.size or (3000 if args.quick else 20_000)
    repeats = max(3, args.repeats or 3)
    hidden = args.hidden or (512 if args.quick else 1536)
    params = [f"n={size}", f"m={size}", f"hidden={hidden}"]
    report = Report("end_to_end", quick=args.quick)
    root = Path(tempfile.mkdtemp(prefix="jacpipe-e2e-", dir=args.dir or "/tmp"))
    manifests: list[dict[str, Any]] = []

    ray.init(include_dashboard=False, logging_level="ERROR")
    try:
        run(RunOptions(job="mlp", params=["n=64", "m=64"], out=str(root / "warm"),
                       progress=False), echo=lambda _: None)
        threads = _threads_in_a_task()
        problem = build(n=size, m=size, hidden=hidden)
        schema = dense_schema(size, "float32")

        def pipeline_run() -> None:
            summary = run(RunOptions(job="mlp", params=params, out=str(root / "jacpipe"),
                                     resume=False, overwrite=True, progress=False),
                          echo=lambda _: None)
            manifests.append(summary.manifest.to_json())

        def in_process() -> None:
            jac = torch.func.jacrev(problem.fn)(problem.x)
            values = np.ascontiguousarray(jac.numpy()).reshape(-1)  # rows, as a file needs
            table = pa.table({"row": pa.array(np.arange(size, dtype=np.int64)),
                              "values": pa.FixedSizeListArray.from_arrays(pa.array(values), size)},
                             schema=schema)
            pq.write_table(
                table, root / "inprocess.parquet", row_group_size=group_rows(size, 4),
                compression="zstd", use_dictionary=False, write_statistics=["row"],
                column_encoding={"row": "PLAIN", "values.list.element": "BYTE_STREAM_SPLIT"},
            )

        print(f"mlp {size} x {size} (hidden {hidden}), {repeats} rounds ...", flush=True)
        times = interleaved({"jacpipe run (Ray up, 2 workers)": pipeline_run,
                             "in-process jacrev + pq.write_table": in_process},
                            repeats=repeats, warmup=0)
        cluster = ray.cluster_resources()
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)

    ours = median(times["jacpipe run (Ray up, 2 workers)"])
    base = median(times["in-process jacrev + pq.write_table"])
    last = manifests[-1]
    shards = last["shards"]
    report.table(
        f"mlp {size:,} x {size:,} float32 ({size * size * 4 / 1e9:.2f} GB), median of {repeats}",
        ["", "median", "min", "time / in-process"],
        [[k, seconds(median(v)), seconds(min(v)), f"{median(v) / base:.2f}x"]
         for k, v in times.items()],
    )
    worker_s = sum(float(s["seconds"]) for s in shards)
    report.table(
        "The jacpipe run (last round)",
        ["shards", "method", "chunk", "budget", "sum of shard seconds", "compute wall",
         "torch threads per task"],
        [[len(shards), last["method"], ",".join(sorted({str(s["chunk_size"]) for s in shards})),
          f"{last['options']['memory_budget'] / 2**30:.1f} GiB", f"{worker_s:.1f} s",
          f"{last['compute_seconds']:.1f} s", threads["torch_threads"]]],
    )
    report.target(Target("jacpipe run / in-process time", ours / base, TARGET,
                         higher_is_better=False))
    report.facts = {"size": size, "hidden": hidden, "times_s": times,
                    "cluster": cluster, "threads_in_task": threads,
                    "shards": [{k: s[k] for k in ("index", "rows", "seconds", "chunk_size",
                                                  "peak_rss", "pid")} for s in shards]}
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
