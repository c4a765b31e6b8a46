"""Test helpers: results written by ``compute_shard`` without Ray."""

from __future__ import annotations

import os

import numpy as np

from pipeline.core.shard import ShardSpec
from pipeline.problem.problem import build_problem, fingerprint, validate
from pipeline.runner.worker import compute_shard
from pipeline.store.manifest import Manifest
from pipeline.store.storage import Storage


def _specs(out, job, params, *, shards=2, threads=1, group_rows=16, chunk=7, **extra):
    problem = build_problem(job, params)
    shapes = validate(problem)
    fp = fingerprint(problem, shapes)
    total = shapes.total_rows
    cuts = np.linspace(0, total, shards + 1).astype(int)
    specs = [
        ShardSpec(job=job, params=params, fingerprint=fp, shapes=shapes, index=i,
                  start=int(a), stop=int(b), out=str(out), method="rev", layout="dense",
                  memory_budget=2**30, threads=threads, device="cpu", device_param=False,
                  run_id="r", group_rows=group_rows, chunk_size=chunk, **extra)
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True))
    ]
    return problem, shapes, specs


def _finish(out, shapes, results, layout="dense"):
    Manifest.from_json({
        "format_version": 1, "kind": shapes.kind, "shapes": shapes.to_json(),
        "dtype": shapes.dtype, "layout": layout,
        "plan": [[r.start, r.stop] for r in results],
        "shards": [r.to_json() for r in results], "status": "complete",
    }).write(Storage(str(out)))


def _run(out, job, params, **kw):
    os.makedirs(out, exist_ok=True)
    problem, shapes, specs = _specs(out, job, params, **kw)
    results = [compute_shard(s) for s in specs]
    _finish(out, shapes, results)
    return problem, shapes, results


MLP = {"n": 40, "m": 50, "hidden": 16}
