"""Analysis of a stored result: finite-difference cross-check, plots, streamed SVD.

Each function opens a result folder and streams its rows; none loads the
whole matrix (except a sparse result, which is held as CSR).
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import JacpipeError


def _rebuilt(result: Any) -> Any:
    from pipeline.problem import build_problem, check_fingerprint, fingerprint, validate

    man = result.manifest
    problem = build_problem(man["job"], man["params"])
    check_fingerprint(man["fingerprint"], fingerprint(problem, validate(problem, man["job"])))
    return problem


def fd_report(out: str, *, columns: int = 16, sample: int = 0, seed: int = 0) -> Any:
    """Finite differences on sampled input columns against the stored AD columns.

    Also flags inputs along which ``fn`` has a kink at ``x`` (see
    :func:`pipeline.fd.fd_check` for the step sizes and the error model).

    Args:
        out: result folder.
        columns: how many input columns to check (all when ``n`` is smaller).
        sample: for batched results, which sample to check.

    Returns:
        A :class:`pipeline.fd.FDReport`.
    """
    import numpy as np
    import torch

    from pipeline.fd import fd_check, sample_columns
    from pipeline.store import open_jacobian

    result = open_jacobian(out)
    problem = _rebuilt(result)
    shapes = result.shapes
    if columns < 1:
        raise JacpipeError(f"--fd-columns must be at least 1, got {columns}")
    if shapes.kind == "batched":
        if not 0 <= sample < (shapes.batch or 0):
            raise JacpipeError(f"--sample {sample}: the result has {shapes.batch} samples")
        fn, x = problem.fn, problem.x[sample]
        rows = np.arange(sample * shapes.m, (sample + 1) * shapes.m)
    elif shapes.kind == "hessian":
        def grad(v: torch.Tensor) -> torch.Tensor:
            return torch.func.grad(lambda t: problem.fn(t).reshape(()))(v)

        fn, x, rows = grad, problem.x, None
    else:
        fn, x, rows = problem.fn, problem.x, None
    cols = sample_columns(shapes.n, columns, seed=seed)

    def ad_columns(wanted: Any) -> Any:
        wanted = np.asarray(wanted, dtype=np.int64)
        if result.layout == "sparse":
            mat = result.read(rows, as_="scipy")
            return mat[:, wanted].toarray()
        parts = [block[:, wanted] for _, block in result.iter_blocks(rows)]
        return np.concatenate(parts) if parts else np.zeros((0, len(wanted)))

    return fd_check(fn, x, ad_columns, cols)


def _dense_blocks(result: Any) -> Any:
    for rows, block in result.iter_blocks():
        yield int(rows[0]), block


def plot_result(out: str, path: str, *, max_pixels: int = 512) -> str:
    """Write a picture of a result: heatmap (dense) or spy plot (sparse), with norm profiles.

    Returns:
        The path written.
    """
    from pipeline.store import open_jacobian

    if not str(path).lower().endswith(".png"):
        raise JacpipeError(f"--plot {path}: expected a .png file name")
    result = open_jacobian(out)
    problems = result.check(checksums=False)
    if problems:
        raise JacpipeError(f"cannot plot an incomplete result: {problems[0]}")
    try:
        return _plot(result, path, max_pixels=max_pixels)
    except OSError as exc:
        raise JacpipeError(f"--plot {path}: cannot write it ({exc.strerror or exc})") from None


def _plot(result: Any, path: str, *, max_pixels: int) -> str:
    man = result.manifest
    title = f"{man['job']} {man['kind']} {result.shape[0]}x{result.shape[1]} {result.dtype}"
    if result.layout == "sparse":
        from pipeline.plot import plot_sparse

        return str(plot_sparse(result.read(as_="scipy"), path, max_pixels=max_pixels, title=title))
    from pipeline.plot import plot_dense

    return str(plot_dense(_dense_blocks(result), result.shape, path, max_pixels=max_pixels,
                          title=title))


def svd_result(out: str, k: int, *, power_iters: int = 2, seed: int = 0) -> Any:
    """Top-``k`` singular values by randomized range-finding over streamed row blocks.

    Returns:
        A :class:`pipeline.svd.SVDResult` (``s``, ``condition_estimate``, ...).
    """
    from pipeline.store import open_jacobian
    from pipeline.svd import streamed_svd

    result = open_jacobian(out)
    if k < 1:
        raise JacpipeError(f"--svd must be at least 1, got {k}")
    problems = result.check(checksums=True)
    if problems:
        raise JacpipeError(f"cannot take the SVD of an incomplete result: {problems[0]}")
    if result.layout == "sparse":
        mat = result.read(as_="scipy")
        step = 4096

        def blocks() -> Any:
            for a in range(0, mat.shape[0], step):
                yield mat[a : a + step].toarray()
    else:
        def blocks() -> Any:
            for _, block in result.iter_blocks(verify=False):
                yield block

    return streamed_svd(blocks, result.shape[1], k, power_iters=power_iters, seed=seed)
