"""``jacpipe inspect``: what a result folder holds, computed by streaming its rows."""

from __future__ import annotations

from typing import Any


def summarize(out: str, *, checksums: bool = True) -> dict[str, Any]:
    """Facts about a result: shape, dtype, shards, timings, norms, zeros, NaN/Inf.

    Rows are streamed one row group at a time; only trusted shards are read,
    and missing or corrupt ones are listed under ``problems``.

    Raises:
        JacpipeError: the folder is not a jacpipe result.
    """
    import numpy as np

    from pipeline.store import open_jacobian

    result = open_jacobian(out)
    man = result.manifest
    broken = result.check(checksums=checksums)
    bad = {p.index for p in broken}
    good = [s for s in result.committed if s["index"] not in bad]
    fro2 = 0.0
    max_abs = 0.0
    zeros = 0
    entries = 0
    nan = 0
    inf = 0
    if result.layout == "dense":
        rows = np.concatenate([np.arange(s["start"], s["stop"]) for s in good] or [[]]).astype(
            np.int64
        )
        if len(rows):
            for _, block in result.iter_blocks(rows, verify=False):
                finite = np.isfinite(block)
                nan += int(np.isnan(block).sum())
                inf += int(np.isinf(block).sum())
                vals = np.where(finite, block, 0.0).astype(np.float64)
                fro2 += float((vals * vals).sum())
                max_abs = max(max_abs, float(np.abs(vals).max(initial=0.0)))
                zeros += int((block == 0).sum())
                entries += block.size
        nnz = entries - zeros
    else:
        mat = result.read(as_="scipy", verify=False) if not broken else None
        nnz = int(mat.nnz) if mat is not None else 0
        if mat is not None:
            vals = mat.data.astype(np.float64)
            nan, inf = int(np.isnan(vals).sum()), int(np.isinf(vals).sum())
            vals = vals[np.isfinite(vals)]
            fro2 = float((vals * vals).sum())
            max_abs = float(np.abs(vals).max(initial=0.0))
            entries = result.shape[0] * result.shape[1]
            zeros = entries - nnz
    seconds = [float(s.get("seconds", 0.0)) for s in result.committed]
    return {
        "out": result.storage.display,
        "job": man["job"],
        "params": man["params"],
        "kind": man["kind"],
        "layout": result.layout,
        "method": man.get("method"),
        "status": man.get("status"),
        "shape": list(result.shape),
        "full_shape": list(result.full_shape),
        "dtype": result.dtype,
        "shards_planned": len(man["plan"]),
        "shards_committed": len(result.committed),
        "problems": [str(p) for p in broken],
        "wall_seconds": man.get("wall_seconds"),
        "shard_seconds": {
            "total": round(sum(seconds), 4),
            "median": round(float(np.median(seconds)), 4) if seconds else None,
            "max": round(max(seconds), 4) if seconds else None,
        },
        "nodes": sorted({s.get("node_id", "?") for s in result.committed}),
        "devices": sorted({s.get("device", "?") for s in result.committed}),
        "frobenius_norm": fro2**0.5,
        "max_abs": max_abs,
        "zero_fraction": zeros / entries if entries else None,
        "nnz": nnz,
        "density": nnz / (result.shape[0] * result.shape[1]) if result.shape[0] else None,
        "colours": man.get("coloring", {}).get("num_colors"),
        "coloring_mode": man.get("coloring", {}).get("mode"),
        "nan": nan,
        "inf": inf,
        "nan_inf_by_shard": {
            str(s["index"]): [int(s.get("nan", 0)), int(s.get("inf", 0))]
            for s in result.committed
            if s.get("nan") or s.get("inf")
        },
        "shards": [
            {k: s.get(k) for k in ("index", "start", "stop", "rows", "seconds", "node_id",
                                   "device", "attempt", "nan", "inf")}
            for s in result.committed
        ],
        "versions": man.get("versions", {}),
    }
