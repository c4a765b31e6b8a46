"""Colourings of sparsity patterns: which Jacobian columns (or rows) share one AD pass.

A Jacobian ``J`` (m x n) with a known sparsity pattern is recovered from a
*compressed* matrix ``J @ S`` (one JVP per colour, forward mode) when columns of
one colour never share a row, or from ``S.T @ J`` (one VJP per colour, reverse
mode) when rows of one colour never share a column. A Hessian, being symmetric,
needs only a *star* colouring (Gebremedhin, Manne, Pothen, SIAM Review 47(4),
2005), which usually has fewer colours than a column colouring.

All functions take a ``scipy.sparse`` matrix (or a 2-D numpy array); stored
entries that are zero are not part of the pattern. Colour vectors are ``int64``
arrays with values ``0 .. num_colors - 1``.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

MODES = ("fwd", "rev", "symmetric")

# NOTE: [numba colouring kernels]
# The loops below are compiled with numba (``_kernels``, on first use, about
# 10 s; cached on disk next to this file when it is writable). Measured on
# the 1000 x 1000 5-point stencil (1e6 columns, a shared 2-core machine):
# natural-order greedy 0.03-0.07 s (7 colours), DSATUR with a bucket queue
# walking the rows directly 0.2-0.25 s (5 colours, the optimum); the whole
# column_coloring 0.27 s against 0.37 s for SciPy's group_columns (11
# colours) in benchmarks/sparsity.md; the earlier batched NumPy DSATUR took
# 2.2 s. Building the column intersection graph first (0.35 s) made DSATUR
# no faster.
# Beyond this many (row, column, column) triples, sum over rows of nnz^2,
# only natural-order greedy runs.
_GRAPH_MAX_PRODUCTS = 2e8
# DSATUR keys its buckets by (saturation, two-hop count); past this many
# buckets it is skipped (a column whose rows hold ~7000 entries), as is a
# column x colour table above _DSATUR_MAX_TABLE bytes.
_DSATUR_MAX_BUCKETS = 5e7
_DSATUR_MAX_TABLE = 2**28

# NOTE: [star colouring cost]
# The greedy star colouring (NOTE: [star colouring with stars kept]) takes
# about nnz * (1 + colours) steps, more where a vertex has two neighbours of
# one colour next to many others; a few ns each in numba. Each order (natural,
# then largest-first) gives up past this many steps (about 1 s); when both
# do and no distance-2 colouring ran, the largest-first one is finished.
_STAR_MAX_STEPS = 2e8


@dataclass(frozen=True)
class Coloring:
    """A colouring of a sparsity pattern and the AD mode it is meant for.

    Args:
        colors: ``int64`` colour per column (``"fwd"``, ``"symmetric"``) or per
            row (``"rev"``).
        num_colors: number of colours, i.e. AD passes (JVPs, VJPs or HVPs).
        mode: ``"fwd"`` (column colouring, one JVP per colour), ``"rev"`` (row
            colouring, one VJP per colour) or ``"symmetric"`` (star colouring of
            a symmetric pattern, one Hessian-vector product per colour).
    """

    colors: np.ndarray
    num_colors: int
    mode: str

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Coloring.mode must be one of {MODES}, got {self.mode!r}")


def as_pattern(pattern: Any) -> sp.csr_matrix:
    """Convert a sparsity pattern to a boolean CSR matrix without stored zeros.

    Args:
        pattern: a ``scipy.sparse`` matrix or array, or a 2-D numpy array.

    Returns:
        The pattern as ``scipy.sparse.csr_matrix`` of dtype ``bool``.

    Raises:
        ValueError: the pattern is not two-dimensional or not a matrix.
    """
    if sp.issparse(pattern):
        if pattern.ndim != 2:
            raise ValueError(
                f"sparsity pattern must be a 2-D (m, n) matrix, got shape {pattern.shape}"
            )
        # copy: tidying below must not write into the caller's (maybe read-only) arrays
        out = sp.csr_matrix(pattern, dtype=bool, copy=True)
    elif isinstance(pattern, np.ndarray):
        if pattern.ndim != 2:
            raise ValueError(
                f"sparsity pattern must be a 2-D (m, n) matrix, got ndim={pattern.ndim} "
                f"(shape {pattern.shape}); reshape it to (len(fn(x)), len(x))"
            )
        out = sp.csr_matrix(pattern != 0)
    else:
        raise ValueError(
            "sparsity pattern must be a scipy.sparse matrix or a 2-D numpy array, "
            f"got {type(pattern).__name__}; build one with scipy.sparse.csr_matrix(...)"
        )
    out.eliminate_zeros()
    out.sort_indices()
    return out


def column_coloring(pattern: Any) -> np.ndarray:
    """Colour the columns so that no two columns of one colour share a row.

    This is a distance-2 colouring of the bipartite row/column graph, i.e. a
    colouring of the column intersection graph. DSATUR (bucket queue) runs
    first; unless it reaches the lower bound ``max nonzeros in a row``, greedy
    in natural and in largest-first order follow, and the fewest colours win.
    Patterns whose intersection graph would exceed about 2e8 entries get
    natural-order greedy only. Compiled
    with numba (NOTE: [numba colouring kernels]). Measured: tridiagonal 3,
    b bands b, 5-point stencil 5 (also periodic with N divisible by 5; 8 on
    other tori, where the optimum is 6-7), 9-point 9; the 1000 x 1000 5-point
    stencil in about 0.3 s.

    Args:
        pattern: ``(m, n)`` sparsity pattern (see :func:`as_pattern`).

    Returns:
        ``int64`` array of length ``n``: the colour of each column.

    Raises:
        ValueError: the pattern is not a 2-D matrix.
    """
    return _color_columns(as_pattern(pattern))


def row_coloring(pattern: Any) -> np.ndarray:
    """Colour the rows so that no two rows of one colour share a column.

    Args:
        pattern: ``(m, n)`` sparsity pattern.

    Returns:
        ``int64`` array of length ``m``: the colour of each row.

    Raises:
        ValueError: the pattern is not a 2-D matrix.
    """
    return _color_columns(as_pattern(pattern).T.tocsr())


def symmetric_coloring(pattern: Any) -> np.ndarray:
    """Star-colour a symmetric (Hessian) pattern.

    A star colouring is a proper colouring of the adjacency graph in which
    every path on four vertices uses at least three colours; it lets each
    Hessian entry be read from ``H @ S`` at ``(i, color[j])`` or, by symmetry,
    at ``(j, color[i])``. This is a true star colouring (greedy, the
    Gebremedhin-Manne-Pothen rules), tried in natural and largest-first order
    within a cost budget (NOTE: [star colouring cost]); the column
    (distance-2) colouring, which is also a star colouring, is tried first
    unless a dense row makes it quadratic (the star passes are skipped when it
    meets the simple lower bound, e.g. 3 for a tridiagonal Hessian), and the
    fewest colours win. A vertex adjacent to every other (an arrowhead,
    a bordered system) costs linear time and gets 2 colours with its
    neighbours. The pattern is symmetrised (``P | P.T``).

    Args:
        pattern: ``(n, n)`` sparsity pattern of a Hessian.

    Returns:
        ``int64`` array of length ``n``: the colour of each variable.

    Raises:
        ValueError: the pattern is not square.
    """
    p = _symmetrized(as_pattern(pattern))
    adj = _strip_diagonal(p)
    bound = _star_lower_bound(adj)
    best = None
    row_nnz = np.diff(p.indptr).astype(np.float64)
    # The distance-2 pass costs the sum of squared row counts: a hub row makes
    # it quadratic (and needs n colours), so it runs only below that cap.
    if float((row_nnz**2).sum()) <= _GRAPH_MAX_PRODUCTS:
        # With the diagonal: neighbours must differ too (a pattern may omit H[i, i]).
        best = _color_columns(as_pattern(p + sp.identity(p.shape[0], dtype=bool, format="csr")))
        if _count(best) <= bound:
            return best
    degree = np.diff(adj.indptr)
    orders = (np.arange(p.shape[0]), np.argsort(-degree, kind="stable"))
    for order in orders:
        # See NOTE: [star colouring cost].
        colors = _greedy_star(adj, order, max_steps=_STAR_MAX_STEPS)
        if colors is not None and (best is None or _count(colors) < _count(best)):
            best = colors
            if _count(best) <= bound:
                break
    if best is None:  # both orders ran past the budget: finish one, whatever it costs
        best = _greedy_star(adj, orders[1], max_steps=None)
    assert best is not None
    return best


def choose_coloring(pattern: Any, *, symmetric: bool = False) -> Coloring:
    """Pick the colouring that needs the fewest AD passes.

    Args:
        pattern: ``(m, n)`` sparsity pattern.
        symmetric: the pattern is a Hessian's: use :func:`symmetric_coloring`.

    Returns:
        A :class:`Coloring`: ``"symmetric"`` when ``symmetric``, otherwise the
        column colouring (``"fwd"``) unless the row colouring (``"rev"``) needs
        strictly fewer colours.

    Raises:
        ValueError: the pattern is not a 2-D matrix (or not square when
            ``symmetric``).
    """
    p = as_pattern(pattern)
    if symmetric:
        colors = symmetric_coloring(p)
        return Coloring(colors=colors, num_colors=_count(colors), mode="symmetric")
    # A structurally symmetric pattern has the same row and column colourings.
    pt = p.T.tocsr()
    pt.sort_indices()
    sides = [("fwd", p, pt)]
    # Structural symmetry by the index arrays: 10x faster than (p != p.T).nnz.
    if p.shape[0] != p.shape[1] or not (
        np.array_equal(p.indptr, pt.indptr) and np.array_equal(p.indices, pt.indices)
    ):
        sides.append(("rev", pt, p))
    # The side with the smaller lower bound first; the other only if it can
    # win (ties go to forward mode), so a dense row or column costs nothing.
    sides.sort(key=lambda side: _lower_bound(side[1]))
    best: Coloring | None = None
    for mode, q, qt in sides:
        if best is not None:
            bound = _lower_bound(q)
            if bound > best.num_colors or (bound == best.num_colors and mode == "rev"):
                continue
        colors = _color_columns(q, qt)
        count = _count(colors)
        if best is None or count < best.num_colors or (count == best.num_colors and mode == "fwd"):
            best = Coloring(colors=colors, num_colors=count, mode=mode)
    assert best is not None
    return best


def validate_coloring(pattern: Any, coloring: Coloring) -> None:
    """Check that a colouring lets every entry of the pattern be recovered.

    Args:
        pattern: ``(m, n)`` sparsity pattern.
        coloring: the colouring to check.

    Raises:
        ValueError: the colour vector has the wrong length or negative
            entries, or two columns of one colour share a row (``"fwd"``), two
            rows of one colour share a column (``"rev"``), or an entry of a
            symmetric pattern cannot be recovered (``"symmetric"``: neighbours
            of one colour, or a two-coloured path on four vertices).
    """
    p = as_pattern(pattern)
    colors = np.asarray(coloring.colors)
    if coloring.mode == "rev":
        p = p.T.tocsr()
    elif coloring.mode == "symmetric":
        p = _symmetrized(p)
    what = "rows" if coloring.mode == "rev" else "columns"
    if colors.shape != (p.shape[1],):
        raise ValueError(
            f"{coloring.mode} colouring has shape {colors.shape}, expected ({p.shape[1]},): "
            f"one colour per {what[:-1]}"
        )
    if colors.size and (colors.min() < 0 or colors.max() >= coloring.num_colors):
        raise ValueError(
            f"colours must lie in [0, {coloring.num_colors}), got [{colors.min()}, {colors.max()}]"
        )
    if coloring.mode == "symmetric":
        _check_star(p, colors)
        return
    row, c1, c2 = _shared_color(p, colors)
    if row >= 0:
        other = "column" if coloring.mode == "rev" else "row"
        raise ValueError(
            f"invalid {coloring.mode} colouring: {what} {c1} and {c2} both have colour "
            f"{colors[c1]} and share {other} {row}"
        )


# ---------------------------------------------------------------------------
# Column colouring: greedy orderings and DSATUR (numba)
# ---------------------------------------------------------------------------


def _count(colors: np.ndarray) -> int:
    return int(colors.max()) + 1 if colors.size else 0


def _lower_bound(p: sp.csr_matrix) -> int:
    """Colours any column colouring needs: the columns of one row are a clique."""
    return int(np.diff(p.indptr).max()) if p.shape[0] and p.nnz else 0


def _i64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.int64)


def _structure(p: sp.csr_matrix, pt: sp.csr_matrix | None = None) -> tuple[np.ndarray, ...]:
    """CSR and CSC index arrays of ``p`` for the kernels (int32 when they fit: half the memory
    traffic, measured 1.3x faster on the 1e6 stencil)."""
    pc = pt if pt is not None else p.tocsc()
    dtype = np.int32 if max(p.nnz, *p.shape) < 2**31 - 1 else np.int64
    return tuple(np.ascontiguousarray(a, dtype=dtype)
                 for a in (p.indptr, p.indices, pc.indptr, pc.indices))


def _color_columns(p: sp.csr_matrix, pt: sp.csr_matrix | None = None) -> np.ndarray:
    """Column colouring of ``p``; ``pt``, if given, is ``p.T`` as CSR (its CSC structure)."""
    n = p.shape[1]
    if p.nnz == 0:
        return np.zeros(n, dtype=np.int64)
    lower_bound = _lower_bound(p)
    if lower_bound == n:  # a dense row: every column needs its own colour
        return np.arange(n, dtype=np.int64)
    structure = _structure(p, pt)
    row_nnz = np.diff(p.indptr).astype(np.float64)
    k = _loops(float((row_nnz**2).sum()))
    best = None
    if float((row_nnz**2).sum()) <= _GRAPH_MAX_PRODUCTS:
        # DSATUR first: it usually reaches the lower bound, and then greedy
        # (0.13 s of 0.6 s on the 1e6 stencil) is not needed.
        best = _dsatur(structure, k, give_up_at=max(2 * lower_bound, lower_bound + 8))
        if best is not None and _count(best) == lower_bound:
            return best.astype(np.int64)
    order = np.arange(n, dtype=structure[0].dtype)
    colors = k.greedy(*structure, order, _hub_columns(p, row_nnz, structure[0].dtype))
    if best is None or _count(colors) < _count(best):
        best = colors
    if _count(best) > lower_bound and float((row_nnz**2).sum()) <= _GRAPH_MAX_PRODUCTS:
        degree = k.two_hop(*structure)
        colors = k.greedy(*structure, np.argsort(-degree, kind="stable").astype(degree.dtype),
                          np.full(n, -1, dtype=degree.dtype))
        if _count(colors) < _count(best):
            best = colors
    return best.astype(np.int64)


def _hub_columns(p: sp.csr_matrix, row_nnz: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Initial colours for greedy: the columns of the rows too long to walk, numbered.

    Greedy walks a row once per column in it: a row holding most columns (a
    bordered system, a vertex next to nearly all) costs its length squared.
    Its columns need distinct colours anyway, so they get ``0, 1, ...`` up
    front and greedy never walks that row again; the other columns are
    coloured around them. Rows shorter than ``sqrt(_GRAPH_MAX_PRODUCTS) / 10``
    are walked as usual.
    """
    colors = np.full(p.shape[1], -1, dtype=dtype)
    heavy = np.flatnonzero(row_nnz**2 * 100 > _GRAPH_MAX_PRODUCTS)
    if heavy.size:
        hubs = np.unique(p[heavy].indices)
        colors[hubs] = np.arange(hubs.size, dtype=dtype)
    return colors


def _dsatur(structure: tuple[np.ndarray, ...], k: Any, *, give_up_at: int
            ) -> np.ndarray | None:
    """DSATUR colouring of the columns, or None once it needs ``give_up_at`` colours.

    DSATUR colours next the uncoloured column with the most distinct colours
    among the columns it shares a row with (ties: the largest two-hop count,
    i.e. entries in its rows, then the column touched last) with its smallest
    free colour. A bucket queue keyed by (saturation, two-hop count) finds it
    in O(1); neighbours are walked through the rows (no intersection graph).
    """
    n = structure[2].size - 1
    degree = k.two_hop(*structure)
    max_degree = int(degree.max()) if n else 0
    if (give_up_at + 1) * (max_degree + 1) > _DSATUR_MAX_BUCKETS or (
        n * give_up_at > _DSATUR_MAX_TABLE
    ):
        return None
    colors, ok = k.dsatur(*structure, degree, give_up_at)
    return colors if ok else None


def _loops(work: float) -> Any:
    """The colouring loops for about ``work`` steps: plain Python while small and numba unloaded.

    NOTE: [small colourings without numba]
        Loading numba and its cached kernels costs 1-2.6 s on a process's
        first colouring (this 2-core machine, loaded), against 1 ms for the
        colouring of a 1,024-column stencil: most of a small problem's first
        Jacobian. Below :data:`_PYTHON_MAX_WORK` steps the same loops run as
        plain Python on lists (NOTE: [colouring on lists]; about 0.8 us a
        step: DSATUR of the 10^4-column stencil 0.21 s) unless numba is
        loaded already. At the limit the two tie: the 4*10^4-column stencil
        (9.9e5 steps) took 0.73-0.89 s in Python against 1.2-4.0 s with
        numba's load, the 9*10^4-column one (2.2e6) 1.2-2.1 s against
        0.8-1.1 s (fresh processes, this machine loaded).
    """
    if work <= _PYTHON_MAX_WORK and "numba" not in sys.modules:
        return _kernels(compiled=False)
    return _kernels()


#: Steps (sum over rows of nnz^2, or nnz times colours for star colouring)
#: below which a process that has not loaded numba colours in plain Python.
_PYTHON_MAX_WORK = 1e6


@functools.cache
def _kernels(*, compiled: bool = True) -> Any:
    """The colouring loops, numba-compiled unless ``compiled=False`` (NOTE: [numba colouring
    kernels], NOTE: [small colourings without numba])."""

    def greedy(indptr, indices, cptr, cind, order, colors):  # pragma: no cover - compiled
        # First-fit distance-2 colouring of the columns of a CSR/CSC pair;
        # columns coloured on entry (colors >= 0) keep their colour.
        n = cptr.size - 1
        colors = colors.copy()
        mark = np.full(n + 1, -1, indices.dtype)
        for v in order:
            if colors[v] >= 0:
                continue
            for a in range(cptr[v], cptr[v + 1]):
                i = cind[a]
                for b in range(indptr[i], indptr[i + 1]):
                    c = colors[indices[b]]
                    if c >= 0:
                        mark[c] = v
            c = 0
            while mark[c] == v:
                c += 1
            colors[v] = c
        return colors

    def two_hop(indptr, indices, cptr, cind):  # pragma: no cover - compiled
        # Entries in the rows of each column, itself excluded: a degree estimate.
        n = cptr.size - 1
        degree = np.zeros(n, indices.dtype)
        for v in range(n):
            d = 0
            for a in range(cptr[v], cptr[v + 1]):
                i = cind[a]
                d += indptr[i + 1] - indptr[i] - 1
            degree[v] = d
        return degree

    def dsatur(indptr, indices, cptr, cind, degree, width):  # pragma: no cover - compiled
        n = cptr.size - 1
        stride = degree.max() + 1
        head = np.full((width + 1) * stride, -1, indices.dtype)
        nxt = np.full(n, -1, indices.dtype)
        prv = np.full(n, -1, indices.dtype)
        key = degree.copy()
        top = 0
        for v in range(n - 1, -1, -1):  # ties pop the lowest index first
            h = head[key[v]]
            nxt[v] = h
            if h >= 0:
                prv[h] = v
            head[key[v]] = v
            top = max(top, key[v])
        seen = np.zeros(n * width, np.bool_)  # seen[u * width + c]: a neighbour has colour c
        colors = np.full(n, -1, indices.dtype)
        for _ in range(n):
            while head[top] < 0:
                top -= 1
            v = head[top]
            head[top] = nxt[v]
            if nxt[v] >= 0:
                prv[nxt[v]] = -1
            c = 0
            while c < width and seen[v * width + c]:
                c += 1
            if c >= width:
                return colors, False
            colors[v] = c
            for a in range(cptr[v], cptr[v + 1]):
                i = cind[a]
                for b in range(indptr[i], indptr[i + 1]):
                    u = indices[b]
                    if colors[u] >= 0 or seen[u * width + c]:
                        continue
                    seen[u * width + c] = True
                    k = key[u]  # move u one saturation level up
                    if prv[u] >= 0:
                        nxt[prv[u]] = nxt[u]
                    else:
                        head[k] = nxt[u]
                    if nxt[u] >= 0:
                        prv[nxt[u]] = prv[u]
                    k += stride
                    key[u] = k
                    prv[u] = -1
                    nxt[u] = head[k]
                    if head[k] >= 0:
                        prv[head[k]] = u
                    head[k] = u
                    if k > top:
                        top = k
        return colors, True

    def greedy_star(indptr, indices, edge, order, max_steps):  # pragma: no cover - compiled
        # See _greedy_star for the algorithm and its bookkeeping.
        n = indptr.size - 1
        nnz = indices.size
        colors = np.full(n, -1, np.int64)
        forbidden = np.full(n + 1, -1, np.int64)
        treated = np.full(n, -1, np.int64)
        first_v = np.full(n + 1, -1, np.int64)
        first_w = np.full(n + 1, -1, np.int64)
        star = np.full(nnz, -1, np.int64)  # by edge id
        hub = np.full(nnz, -1, np.int64)  # by star id; -1: a one-edge star
        end_a = np.empty(nnz, np.int64)  # the first edge of each star
        end_b = np.empty(nnz, np.int64)
        stars = 0
        leaf_head = np.full(n, -1, np.int64)  # hubs of the stars v is a leaf of
        leaf_next = np.empty(nnz, np.int64)
        leaf_hub = np.empty(nnz, np.int64)
        leaves = 0
        tab_head = np.full(n, -1, np.int64)  # (vertex, neighbour colour) -> star
        tab_next = np.empty(nnz, np.int64)
        tab_col = np.empty(nnz, np.int64)
        tab_star = np.empty(nnz, np.int64)
        tabs = 0
        steps = 0
        for v in order:
            for k in range(indptr[v], indptr[v + 1]):
                w = indices[k]
                cw = colors[w]
                if cw < 0:
                    continue
                steps += 1
                forbidden[cw] = v
                if first_v[cw] == v:  # a second neighbour of colour cw: v is a hub
                    q = first_w[cw]
                    for u in (q, w):
                        if treated[u] == v:
                            continue
                        treated[u] = v
                        steps += indptr[u + 1] - indptr[u]
                        for r in range(indptr[u], indptr[u + 1]):
                            cx = colors[indices[r]]
                            if cx >= 0:
                                forbidden[cx] = v
                else:
                    first_v[cw] = v
                    first_w[cw] = w
                    t = leaf_head[w]
                    while t >= 0:  # w a leaf of a star centred on h: v must not take h's colour
                        forbidden[colors[leaf_hub[t]]] = v
                        steps += 1
                        t = leaf_next[t]
            if steps > max_steps:
                return colors, False
            c = 0
            while forbidden[c] == v:
                c += 1
            colors[v] = c
            for k in range(indptr[v], indptr[v + 1]):
                w = indices[k]
                cw = colors[w]
                if cw < 0:
                    continue
                steps += 1
                # (vertex, neighbour colour) -> star: w's star to colour c, v's to cw
                # (inline loops: a call to another kernel would defeat numba's cache)
                s_w = -1
                t = tab_head[w]
                while t >= 0 and s_w < 0:
                    if tab_col[t] == c:
                        s_w = tab_star[t]
                    t = tab_next[t]
                s_v = -1
                t = tab_head[v]
                while t >= 0 and s_v < 0:
                    if tab_col[t] == cw:
                        s_v = tab_star[t]
                    t = tab_next[t]
                s, h = (s_w, w) if s_w >= 0 else (s_v, v)
                if s < 0:
                    s = stars
                    stars += 1
                    end_a[s] = v
                    end_b[s] = w
                else:
                    if hub[s] < 0:  # the star's first edge gets its hub
                        hub[s] = h
                        other = end_b[s] if end_a[s] == h else end_a[s]
                        leaf_hub[leaves] = h
                        leaf_next[leaves] = leaf_head[other]
                        leaf_head[other] = leaves
                        leaves += 1
                    leaf = v if h == w else w
                    leaf_hub[leaves] = h
                    leaf_next[leaves] = leaf_head[leaf]
                    leaf_head[leaf] = leaves
                    leaves += 1
                star[edge[k]] = s
                if s_w < 0:
                    tab_col[tabs] = c
                    tab_star[tabs] = s
                    tab_next[tabs] = tab_head[w]
                    tab_head[w] = tabs
                    tabs += 1
                if s_v < 0:
                    tab_col[tabs] = cw
                    tab_star[tabs] = s
                    tab_next[tabs] = tab_head[v]
                    tab_head[v] = tabs
                    tabs += 1
        return colors, True

    loops = {"greedy": greedy, "two_hop": two_hop, "dsatur": dsatur, "greedy_star": greedy_star}
    if not compiled:
        return types.SimpleNamespace(**{name: _on_lists(f) for name, f in loops.items()})
    import numba

    # Cache compiled code next to this file when that is writable (else numba
    # might fail to find a cache locator); otherwise compile per process.
    cache = os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK) or bool(
        os.environ.get("NUMBA_CACHE_DIR"))
    njit = numba.njit(cache=cache, nogil=True)
    return types.SimpleNamespace(**{name: njit(f) for name, f in loops.items()})


class _List(list):  # type: ignore[type-arg]
    """A list with the few array members the colouring loops use (NOTE: [colouring on lists])."""

    dtype = None

    @property
    def size(self) -> int:
        return len(self)

    def max(self) -> Any:
        return max(self)

    def copy(self) -> _List:
        return _List(self)


class _ListNumpy:
    """The ``np`` the plain-Python colouring loops see: their arrays are :class:`_List`."""

    int64 = bool_ = None

    @staticmethod
    def full(n: int, value: Any, dtype: Any = None) -> _List:
        return _List([value] * int(n))

    @staticmethod
    def zeros(n: int, dtype: Any = None) -> _List:
        return _List([0] * int(n))

    empty = zeros


def _on_lists(loop: Any) -> Any:
    """``loop`` run in plain Python on lists, its arrays in and out converted.

    NOTE: [colouring on lists]
        Plain Python indexing a NumPy array makes a NumPy scalar of every
        element read, and its arithmetic is NumPy's too: about 4x slower than
        the same loop over Python lists (DSATUR of the 10^4-column 5-point
        stencil: 0.29 s on NumPy arrays, 0.07 s on lists, this machine
        loaded). So the uncompiled loops run the numba kernels' own code with
        ``np`` bound to :class:`_ListNumpy`, arrays passed in as lists and
        lists handed back as ``int64`` arrays.
    """
    fn = types.FunctionType(loop.__code__, {**loop.__globals__, "np": _ListNumpy},
                            loop.__name__, loop.__defaults__, loop.__closure__)

    def run(*args: Any) -> Any:
        out = fn(*(_List(a.tolist()) if isinstance(a, np.ndarray) else a for a in args))
        if isinstance(out, tuple):
            return tuple(np.asarray(o, dtype=np.int64) if isinstance(o, list) else o
                         for o in out)
        return np.asarray(out, dtype=np.int64)

    run.__name__ = loop.__name__
    return run


def _strip_diagonal(a: sp.csr_matrix) -> sp.csr_matrix:
    coo = a.tocoo()
    keep = coo.row != coo.col
    n = a.shape[0]
    out = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=bool), (coo.row[keep], coo.col[keep])), shape=(n, n)
    )
    out.sort_indices()
    return out


# ---------------------------------------------------------------------------
# Star colouring (symmetric patterns)
# ---------------------------------------------------------------------------


def _symmetrized(p: sp.csr_matrix) -> sp.csr_matrix:
    if p.shape[0] != p.shape[1]:
        raise ValueError(
            f"a Hessian (symmetric) pattern must be square, got shape {p.shape}; "
            "pass the (n, n) pattern of the Hessian over x.reshape(-1)"
        )
    out = (p + p.T).tocsr()
    out.sort_indices()
    return out


def _star_lower_bound(adj: sp.csr_matrix) -> int:
    """Colours any star colouring of ``adj`` needs: 2 with an edge, 3 with a path on 4 vertices."""
    n = adj.shape[0]
    if adj.nnz == 0:
        return min(n, 1)
    degree = np.diff(adj.indptr)
    b = np.repeat(np.arange(n, dtype=np.int64), degree)
    c = adj.indices.astype(np.int64)
    inner = (degree[b] >= 2) & (degree[c] >= 2)
    # Edge b-c with a further neighbour a of b and d of c, a != d: if either
    # has degree >= 3 one can always pick them apart; at degree 2 each, the
    # single other neighbours must differ (else b, c, a is a triangle).
    if (inner & (np.maximum(degree[b], degree[c]) >= 3)).any():
        return 3
    total = adj.astype(np.int64) @ np.arange(n, dtype=np.int64)  # sum of neighbours
    if (inner & (total[b] - c != total[c] - b)).any():
        return 3
    return 2


def _greedy_star(
    adj: sp.csr_matrix, order: np.ndarray, *, max_steps: float | None
) -> np.ndarray | None:
    """Greedy star colouring of the graph ``adj`` (no self loops) in ``order``.

    Returns None once it has taken more than ``max_steps`` steps (``None``: no limit).
    """
    # NOTE: [star colouring with stars kept]
    # Gebremedhin, Tarafdar, Manne, Pothen (SIAM J. Sci. Comput. 29(3), 2007),
    # Algorithm 4.1, as SparseMatrixColorings.jl's star_coloring writes it:
    # the edges between coloured vertices are kept as two-coloured stars
    # (a hub and leaves). When v is coloured, for each coloured neighbour w
    # of colour cw it forbids cw, and
    #   - if v already has another neighbour q of colour cw (v becomes a
    #     hub): every colour next to q and to w (a path q-v-w-x would be
    #     two-coloured otherwise);
    #   - else: the colour of every hub h of a star w is a leaf of (a path
    #     v-w-h-y, y another leaf of h, would be two-coloured).
    # SMC finds those hubs by walking all neighbours of w, which costs n per
    # vertex next to a hub adjacent to everything (an arrowhead: n^2 in all).
    # Here each vertex keeps the list of hubs it is a leaf of (at most one per
    # colour) and a (vertex, neighbour colour) -> star table, so a vertex
    # costs its degree times the colours, and the arrowhead is linear.
    n = adj.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    entry = np.arange(1, adj.nnz + 1, dtype=np.int64)
    twin = sp.csr_matrix((entry, adj.indices, adj.indptr), shape=adj.shape).T.tocsr()
    twin.sort_indices()  # the structure is symmetric: twin.data[k] - 1 is entry k's mirror
    edge = np.minimum(np.arange(adj.nnz, dtype=np.int64), twin.data - 1)
    limit = np.iinfo(np.int64).max if max_steps is None else int(max_steps)
    # a step per entry and colour, about (NOTE: [star colouring cost]); 8 colours assumed
    colors, ok = _loops(8.0 * adj.nnz).greedy_star(_i64(adj.indptr), _i64(adj.indices),
                                                   _i64(edge), _i64(order), limit)
    return colors if ok else None


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _shared_color(p: sp.csr_matrix, colors: np.ndarray) -> tuple[int, int, int]:
    """A row holding two columns of one colour, and those columns; -1s if none."""
    if p.nnz == 0:
        return -1, -1, -1
    rows = np.repeat(np.arange(p.shape[0], dtype=np.int64), np.diff(p.indptr))
    key = rows * (int(colors.max()) + 1) + colors[p.indices]
    order = np.argsort(key, kind="stable")
    dup = np.flatnonzero(key[order][1:] == key[order][:-1])
    if dup.size == 0:
        return -1, -1, -1
    a, b = order[dup[0]], order[dup[0] + 1]
    return int(rows[a]), int(p.indices[a]), int(p.indices[b])


def _check_star(p: sp.csr_matrix, colors: np.ndarray) -> None:
    n = p.shape[0]
    i = np.repeat(np.arange(n, dtype=np.int64), np.diff(p.indptr))
    j = p.indices.astype(np.int64)
    same = np.flatnonzero((colors[i] == colors[j]) & (i != j))
    if same.size:
        a, b = i[same[0]], j[same[0]]
        raise ValueError(
            f"invalid symmetric colouring: neighbours {a} and {b} both have colour {colors[a]}"
        )
    # Entry (i, j) not readable in row i must be readable in row j.
    direct = star_direct(p, colors)
    unreadable = ~direct & ~np.isin(j * n + i, i[direct] * n + j[direct])
    if unreadable.any():
        a, b = i[unreadable][0], j[unreadable][0]
        raise ValueError(
            f"invalid symmetric colouring: entry ({a}, {b}) cannot be recovered; "
            f"colour {colors[b]} occurs twice among the neighbours of {a} and colour "
            f"{colors[a]} twice among those of {b} (a two-coloured path on 4 vertices)"
        )


def star_direct(p: sp.csr_matrix, colors: np.ndarray) -> np.ndarray:
    """For each stored entry (i, j) of a symmetric pattern, whether it is read in row i.

    With ``B = H @ S`` (one Hessian-vector product per colour), entry ``(i, j)``
    equals ``B[i, colors[j]]`` when ``j`` is the only column of row ``i`` with
    that colour; otherwise, under a star colouring, it equals
    ``B[j, colors[i]]``. Diagonal entries of a proper colouring are always
    direct.

    Args:
        p: a symmetric boolean CSR pattern with sorted indices.
        colors: a proper colouring of it.

    Returns:
        A boolean array over the stored entries of ``p``, in CSR order.
    """
    k = max(_count(colors), 1)
    rows = np.repeat(np.arange(p.shape[0], dtype=np.int64), np.diff(p.indptr))
    key = rows * k + colors[p.indices]
    _, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    return counts[inverse] == 1
