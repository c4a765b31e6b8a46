"""``jacpipe inspect``: what a result folder holds, its picture and its singular values.

Every function opens a result folder and streams its rows one row group at a
time; none loads the whole matrix (except a sparse result, held as CSR).
Nothing here rebuilds or runs the job: inspecting a result executes no code
named in it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import kind_of, layout_of

if TYPE_CHECKING:
    from pipeline.store.reader import JacobianResult


def summarize(out: str, *, checksums: bool = True) -> dict[str, Any]:
    """Facts about a result: shape, dtype, shards, timings, norms, zeros, NaN/Inf.

    Rows are streamed one row group at a time; only trusted shards are read,
    and missing or corrupt ones are listed under ``problems``.

    Raises:
        JacpipeError: the folder is not a jacpipe result.
    """
    import numpy as np

    from pipeline.store.folder import stray_parts
    from pipeline.store.reader import open_jacobian
    from pipeline.store.storage import shown_name

    result = open_jacobian(out)
    man = result.manifest
    broken = result.check(checksums=checksums)
    bad = {p.index for p in broken}
    good = [s for s in result.committed if s.index not in bad]
    if layout_of(result.layout).fixed_width:
        stats = _dense_stats(result, good)
    else:
        stats = _sparse_stats(result.read(as_="scipy", verify=False) if not broken else None,
                              result.shape)
    fro2, max_abs, zeros, entries, nan, inf = (
        stats[k] for k in ("fro2", "max_abs", "zeros", "entries", "nan", "inf")
    )
    nnz = stats["nnz"]
    smoothed: dict[str, Any] = {}
    if man.smoothing is not None:
        from pipeline.analysis.smoothing import summary

        smoothed = {"smoothing": summary(result, good)}
    if kind_of(man.kind).per_point:
        smoothed = {"operator": operator_summary(result, good)}
    seconds = [float(s.seconds) for s in result.committed]
    return {
        "out": result.storage.display,
        "job": man.job,
        "params": man.params,
        "kind": man.kind,
        "layout": result.layout,
        "method": man.method,
        "status": man.status,
        "shape": list(result.shape),
        "display_shape": display_shape(result),
        "full_shape": list(result.full_shape),
        "dtype": result.dtype,
        "shards_planned": len(man.plan),
        "shards_committed": len(result.committed),
        "problems": [str(p) for p in broken],
        "wall_seconds": man.wall_seconds,
        "shard_seconds": {
            "total": round(sum(seconds), 4),
            "median": round(float(np.median(seconds)), 4) if seconds else None,
            "max": round(max(seconds), 4) if seconds else None,
        },
        "nodes": sorted({s.node_id for s in result.committed}),
        "devices": sorted({s.device for s in result.committed}),
        "frobenius_norm": fro2**0.5,
        "max_abs": max_abs,
        "zero_fraction": zeros / entries if entries else None,
        "nnz": nnz,
        "density": nnz / (result.shape[0] * result.shape[1]) if result.shape[0] else None,
        "colours": (man.coloring or {}).get("num_colors"),
        "coloring_mode": (man.coloring or {}).get("mode"),
        "pattern_source": (man.coloring or {}).get("source"),
        "sparsity_detection": man.extra.get("sparsity_detection"),
        "nan": nan,
        "inf": inf,
        "nan_inf_by_shard": {
            str(s.index): [s.nan, s.inf] for s in result.committed if s.nan or s.inf
        },
        "shards": [
            {k: getattr(s, k) for k in ("index", "start", "stop", "rows", "seconds", "node_id",
                                        "device", "attempt", "nan", "inf")}
            for s in result.committed
        ],
        "versions": man.versions,
        # part-like files the manifest does not own: pandas or pyarrow.dataset
        # on the folder would count their rows (a resume moves them aside)
        "stray_files": [shown_name(n) for n in
                        stray_parts(result.storage.listdir(), len(man.plan))],
        **smoothed,
    }


def operator_summary(result: JacobianResult, good: list[Any]) -> dict[str, Any]:
    """A per-point result's statistics: the operator's values, ``fn``'s, standard errors.

    Args:
        result: an opened per-point result.
        good: the trusted shards (the others are left out).

    Returns:
        ``options`` (the operator's), and ``min``, ``median``, ``mean``, ``max`` of
        each stored column over the points of the trusted shards.
    """
    import numpy as np

    from pipeline.analysis.smoothing import read_column

    rows = np.concatenate([np.arange(s.start, s.stop) for s in good] or [[]]).astype(np.int64)
    out: dict[str, Any] = {"options": result.manifest.fingerprint.get("operator") or {}}
    for column in ("values", "value", "stderr"):
        if column not in result.manifest.part_schema().names or not len(rows):
            continue
        data = read_column(result, column, rows)
        data = data[np.isfinite(data)]
        out[column] = {k: float(f(data)) if data.size else None for k, f in (
            ("min", np.min), ("median", np.median), ("mean", np.mean), ("max", np.max))}
    return out


def display_shape(result: JacobianResult) -> str:
    """The shape as a person reads it: ``m x n``, or ``B x (m x n)`` for a batched result.

    Args:
        result: an opened result (:class:`pipeline.store.reader.JacobianResult`).

    Returns:
        E.g. ``"2000x1500"`` or ``"200 x (6 x 6)"``.
    """
    s = result.shapes
    if kind_of(s.kind).per_point:
        return f"{s.batch} points x {s.n}"
    if kind_of(s.kind).rows_over == "pairs":
        return f"{s.m} pairs x {s.n} ({s.n} x {s.n} x {s.n} symmetric)"
    if kind_of(s.kind).per_sample:
        return f"{s.batch} x ({s.m} x {s.n})"
    return f"{result.shape[0]}x{result.shape[1]}"


#: What ``--plot`` can write, by file extension (matplotlib's Agg, SVG and PDF backends).
PLOT_FORMATS = ("png", "svg", "pdf")


def _dense_stats(result: JacobianResult, good: list[Any]) -> dict[str, Any]:
    """Norm, max, zeros, NaN/Inf of the trusted shards of a dense result, streamed."""
    import numpy as np

    from pipeline.store.parts import count_nonfinite

    out = dict(fro2=0.0, max_abs=0.0, zeros=0, entries=0, nan=0, inf=0)
    rows = np.concatenate([np.arange(s.start, s.stop) for s in good] or [[]]).astype(np.int64)
    if len(rows):
        for _, block in result.iter_blocks(rows, verify=False):
            nan, inf = count_nonfinite(block)
            vals = np.where(np.isfinite(block), block, 0.0).astype(np.float64)
            out["nan"] += nan
            out["inf"] += inf
            out["fro2"] += float((vals * vals).sum())
            out["max_abs"] = max(out["max_abs"], float(np.abs(vals).max(initial=0.0)))
            out["zeros"] += int((block == 0).sum())
            out["entries"] += block.size
    out["nnz"] = out["entries"] - out["zeros"]
    return out


def _sparse_stats(mat: Any, shape: tuple[int, int]) -> dict[str, Any]:
    """The same facts for a sparse result's CSR matrix (None: the result is incomplete)."""
    import numpy as np

    from pipeline.store.parts import count_nonfinite

    out = dict(fro2=0.0, max_abs=0.0, zeros=0, entries=0, nan=0, inf=0, nnz=0)
    if mat is None:
        return out
    vals = mat.data.astype(np.float64)
    out["nan"], out["inf"] = count_nonfinite(vals)
    vals = vals[np.isfinite(vals)]
    out["nnz"] = int(mat.nnz)
    out["fro2"] = float((vals * vals).sum())
    out["max_abs"] = float(np.abs(vals).max(initial=0.0))
    out["entries"] = shape[0] * shape[1]
    out["zeros"] = out["entries"] - out["nnz"]
    return out


def _dense_blocks(result: JacobianResult) -> Any:
    for rows, block in result.iter_blocks():
        yield int(rows[0]), block


def plot_result(out: str, path: str, *, max_pixels: int = 512) -> str:
    """Write a picture of a result: heatmap (dense) or spy plot (sparse), with norm profiles.

    A batched result is drawn as its ``B*m x n`` stack of samples (the title
    says ``B x (m x n)``), with lines at the sample boundaries. The format
    follows the extension: PNG, SVG or PDF.

    Args:
        out: the result folder.
        path: the file to write (``.png``, ``.svg`` or ``.pdf``).
        max_pixels: at most this many pixels per side.

    Raises:
        JacpipeError: another extension, an incomplete result, or an unwritable path.

    Returns:
        The path written.
    """
    from pipeline.analysis.plot import check_plot_folder
    from pipeline.store.reader import open_jacobian

    suffix = str(path).lower().rpartition(".")[2] if "." in str(path) else ""
    if suffix not in PLOT_FORMATS:
        raise JacpipeError(
            f"--plot {path}: expected a .png, .svg or .pdf file name (the format follows "
            "the extension)"
        )
    check_plot_folder(path)
    result = open_jacobian(out)
    problems = result.check(checksums=False)
    if problems:
        raise JacpipeError(f"cannot plot an incomplete result: {problems[0]}")
    try:
        return _plot(result, path, max_pixels=max_pixels)
    except OSError as exc:
        raise JacpipeError(f"--plot {path}: cannot write it ({exc.strerror or exc})") from None


def _plot(result: JacobianResult, path: str, *, max_pixels: int) -> str:
    man = result.manifest
    title = f"{man.job} {man.kind} {display_shape(result)} {result.dtype}"
    if kind_of(man.kind).per_point:
        from pipeline.analysis.plot import plot_points
        from pipeline.analysis.smoothing import read_column

        coords = read_column(result, "x") if "x" in result.manifest.part_schema().names else None
        values = read_column(result, "values")
        return str(plot_points(coords, values, path, title=title, label=man.kind))
    if not layout_of(result.layout).fixed_width:
        from pipeline.analysis.plot import plot_sparse

        return str(plot_sparse(result.read(as_="scipy"), path, max_pixels=max_pixels, title=title))
    from pipeline.analysis.plot import plot_dense

    samples = (result.shapes.batch or 0) if kind_of(man.kind).per_sample else 0
    return str(plot_dense(_dense_blocks(result), result.shape, path, max_pixels=max_pixels,
                          title=title, samples=samples))


def svd_result(out: str, k: int, *, power_iters: int = 2, seed: int = 0) -> Any:
    """Top-``k`` singular values by randomized range-finding over the streamed result.

    The result is read as a linear operator (``as_linear_operator``): each
    pass streams the parts once, dense or sparse, in float64; memory is
    O(block + (m + n)(k + 10)), so results larger than memory work.

    Returns:
        A :class:`pipeline.analysis.svd.SVDResult` (``s``, ``condition_estimate``, ...).
    """
    from pipeline.analysis.svd import operator_svd
    from pipeline.store.reader import open_jacobian

    result = open_jacobian(out)
    if k < 1:
        raise JacpipeError(f"--svd must be at least 1, got {k}")
    problems = result.check(checksums=True)
    if problems:
        raise JacpipeError(f"cannot take the SVD of an incomplete result: {problems[0]}")
    op = result.as_linear_operator(dtype="float64")
    return operator_svd(op, k, power_iters=power_iters, seed=seed)
