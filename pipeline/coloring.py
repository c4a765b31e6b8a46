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

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

MODES = ("fwd", "rev", "symmetric")

# NOTE: [DSATUR round budget]
# The batched DSATUR below colours a set of vertices per numpy round (about
# 60 us of overhead each). On meshes it sweeps a front across the domain in
# O(sqrt(n)) rounds (1,300 to 3,000 rounds on a 1000 x 1000 5-point stencil);
# where it cannot batch (a band: one vertex per round) it would need n rounds.
# It gives up, keeping the greedy colouring, after
# _DSATUR_ROUNDS_PER_SQRT_N * sqrt(n) + _DSATUR_MIN_ROUNDS rounds, or earlier
# once its pace (vertices per round so far) cannot finish within that.
_DSATUR_ROUNDS_PER_SQRT_N = 30
_DSATUR_MIN_ROUNDS = 1000
_DSATUR_MAX_TABLE = 2**28  # bytes of its vertex x colour table
# Beyond this many (row, column, column) triples, sum over rows of nnz^2, the
# column intersection graph is not built and only natural-order greedy runs.
_GRAPH_MAX_PRODUCTS = 2e8

# NOTE: [star colouring cost]
# The greedy star colouring is a python loop of about n * d^3 steps (d: the
# degree; roughly 0.2 us each). It runs, in natural then in largest-first
# order, only while the estimated steps stay below this (about 5 s); past it
# the distance-2 colouring (also a star colouring) is used alone. A 1e6
# tridiagonal Hessian fits; a 1000 x 1000 5-point one gets the distance-2
# colouring, which is optimal there anyway (5).
_STAR_MAX_STEPS = 2e7


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
    colouring of the column intersection graph. Three heuristics are tried and
    the one with the fewest colours kept: greedy in natural order, greedy in
    largest-first order (as ColPack does), and DSATUR (batched, with a round
    budget: NOTE: [DSATUR round budget]). The later ones are skipped once a
    colouring reaches the lower bound ``max nonzeros in a row``, and on
    patterns whose intersection graph would exceed about 2e8 entries.
    Measured: tridiagonal 3, b bands b, 5-point stencil 5 (also periodic with
    N divisible by 5; 8-9 on other tori, where the optimum is 6-7), 9-point 9;
    the 1000 x 1000 5-point stencil in about 2 s of CPU.

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
    (distance-2) colouring, which is also a star colouring, is always tried
    first (the star passes are skipped when it meets the simple lower bound,
    e.g. 3 for a tridiagonal Hessian), and the fewest colours win. The
    pattern is symmetrised (``P | P.T``).

    Args:
        pattern: ``(n, n)`` sparsity pattern of a Hessian.

    Returns:
        ``int64`` array of length ``n``: the colour of each variable.

    Raises:
        ValueError: the pattern is not square.
    """
    p = _symmetrized(as_pattern(pattern))
    best = _color_columns(p)
    adj = _strip_diagonal(p)
    if _count(best) <= _star_lower_bound(adj):
        return best
    degree = np.diff(adj.indptr).astype(np.float64)
    # See NOTE: [star colouring cost].
    steps = float((degree**2).sum()) * max(1.0, float(degree.mean())) if degree.size else 0.0
    orders = (np.arange(p.shape[0]), np.argsort(-degree, kind="stable"))
    for k, order in enumerate(orders, start=1):
        if k * steps > _STAR_MAX_STEPS:
            break
        colors = _greedy_star(adj, order)
        if _count(colors) < _count(best):
            best = colors
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
    sides = [("fwd", p)]
    # A structurally symmetric pattern has the same row and column colourings.
    if p.shape[0] != p.shape[1] or (p != p.T).nnz:
        sides.append(("rev", p.T.tocsr()))
    # The side with the smaller lower bound first; the other only if it can
    # win (ties go to forward mode), so a dense row or column costs nothing.
    sides.sort(key=lambda side: _lower_bound(side[1]))
    best: Coloring | None = None
    for mode, q in sides:
        if best is not None:
            bound = _lower_bound(q)
            if bound > best.num_colors or (bound == best.num_colors and mode == "rev"):
                continue
        colors = _color_columns(q)
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
# Column colouring: greedy orderings and batched DSATUR
# ---------------------------------------------------------------------------


def _count(colors: np.ndarray) -> int:
    return int(colors.max()) + 1 if colors.size else 0


def _lower_bound(p: sp.csr_matrix) -> int:
    """Colours any column colouring needs: the columns of one row are a clique."""
    return int(np.diff(p.indptr).max()) if p.shape[0] and p.nnz else 0


def _color_columns(p: sp.csr_matrix) -> np.ndarray:
    n = p.shape[1]
    if p.nnz == 0:
        return np.zeros(n, dtype=np.int64)
    lower_bound = _lower_bound(p)
    if lower_bound == n:  # a dense row: every column needs its own colour
        return np.arange(n, dtype=np.int64)
    best = _greedy_columns(p, np.arange(n))
    row_nnz = np.diff(p.indptr).astype(np.float64)
    if _count(best) == lower_bound or float((row_nnz**2).sum()) > _GRAPH_MAX_PRODUCTS:
        return best
    graph = _intersection_graph(p)
    degree = np.diff(graph.indptr)
    colors = _greedy_columns(p, np.argsort(-degree, kind="stable"))
    if _count(colors) < _count(best):
        best = colors
    if _count(best) > lower_bound:
        colors = _dsatur(graph, give_up_at=_count(best))
        if colors is not None:
            best = colors
    return best


def _greedy_columns(p: sp.csr_matrix, order: np.ndarray) -> np.ndarray:
    """First-fit greedy colouring of the columns in ``order``."""
    # NOTE: Curtis-Powell-Reid grouping (fill colour 0 with every column that
    # fits, in order, then colour 1, ...) is the same as first-fit greedy
    # colouring in that order. scipy compiles it (Pythran) for its sparse
    # finite differences; it is private API, pinned with scipy in
    # constraints.txt and covered by tests/test_coloring.py.
    from scipy.optimize._numdiff import group_columns

    pattern = sp.csc_matrix(p, dtype=np.int32)
    return np.asarray(group_columns(pattern, order=order), dtype=np.int64)


def _intersection_graph(p: sp.csr_matrix) -> sp.csr_matrix:
    """Column intersection graph (columns adjacent iff they share a row), no loops."""
    # int32 counts of shared rows never wrap to zero (bool or int8 could).
    a = sp.csr_matrix(p, dtype=np.int32)
    graph = (a.T @ a).tocsr()
    return _strip_diagonal(graph)


def _strip_diagonal(a: sp.csr_matrix) -> sp.csr_matrix:
    coo = a.tocoo()
    keep = coo.row != coo.col
    n = a.shape[0]
    out = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=bool), (coo.row[keep], coo.col[keep])), shape=(n, n)
    )
    out.sort_indices()
    return out


def _neighbours(
    indptr: np.ndarray, indices: np.ndarray, vertices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """All (vertex, neighbour) pairs of ``vertices``, as two flat arrays."""
    deg = indptr[vertices + 1] - indptr[vertices]
    owner = np.repeat(vertices, deg)
    starts = np.repeat(indptr[vertices] - np.cumsum(deg) + deg, deg)
    return owner, indices[starts + np.arange(owner.size)]


def _dsatur(graph: sp.csr_matrix, *, give_up_at: int) -> np.ndarray | None:
    """Batched DSATUR colouring of ``graph``, or None once it is no better than ``give_up_at``.

    DSATUR colours next the uncoloured vertex with the most distinct colours
    among its neighbours (ties: highest degree, then lowest index) with its
    smallest free colour. Here a round colours either that one vertex or, when
    the most saturated vertices are *forced* (exactly one free colour among
    those used so far), an independent set of all of them at once: forced
    vertices that are not adjacent do not influence each other, so this is
    DSATUR with another tie-break. A new component starts at its
    highest-degree vertex. See NOTE: [DSATUR round budget].
    """
    n = graph.shape[0]
    indptr = graph.indptr.astype(np.int64)
    indices = graph.indices.astype(np.int64)
    degree = np.diff(indptr)
    colors = np.full(n, -1, dtype=np.int64)
    width = 8  # columns of `forbidden`; doubled when a vertex needs a new colour
    forbidden = np.zeros(n * width, dtype=bool)  # forbidden[v * width + c]
    saturation = np.zeros(n, dtype=np.int64)
    # levels[s]: arrays holding the uncoloured vertices of saturation s, plus
    # stale entries (coloured since, or saturation grown) dropped when read.
    levels: list[list[np.ndarray]] = [[] for _ in range(width + 1)]
    top = 0
    flag = np.zeros(n, dtype=bool)
    slot = np.zeros(n, dtype=np.int64)
    pending = np.zeros(n, dtype=np.int64)
    seeds = np.argsort(-degree, kind="stable")
    next_seed = 0
    used = 0
    budget = _DSATUR_ROUNDS_PER_SQRT_N * math.isqrt(n) + _DSATUR_MIN_ROUNDS
    done = 0
    for rounds in range(budget):
        if rounds >= _DSATUR_MIN_ROUNDS and rounds * n > budget * done:
            return None
        chosen = np.zeros(0, dtype=np.int64)
        while top > 0:
            merged = np.concatenate(levels[top]) if levels[top] else chosen
            chosen = merged[(colors[merged] < 0) & (saturation[merged] == top)]
            levels[top] = [chosen] if chosen.size else []
            if chosen.size:
                break
            top -= 1
        if used == width:
            if n * width * 2 > _DSATUR_MAX_TABLE:
                return None
            forbidden = np.pad(forbidden.reshape(n, width), ((0, 0), (0, width))).reshape(-1)
            levels.extend([] for _ in range(width))
            width *= 2
        if chosen.size == 0:
            while next_seed < n and colors[seeds[next_seed]] >= 0:
                next_seed += 1
            if next_seed == n:
                return colors
            chosen = seeds[next_seed : next_seed + 1]
        elif top != used - 1 and chosen.size > 1:
            # A choice (two or more free colours, or a new one): one vertex.
            best = degree[chosen].max()
            chosen = chosen[degree[chosen] == best].min(keepdims=True)
        # Smallest free colour (< width, since used < width).
        new = np.argmin(forbidden.reshape(n, width)[chosen], axis=1)
        owner, nb = _neighbours(indptr, indices, chosen)
        if chosen.size > 1:
            # Forced vertices (one free colour each) are coloured together,
            # except where two neighbours are forced to the same colour: there
            # the lower index goes first and the other waits.
            flag[chosen] = True
            pending[chosen] = new
            clash = owner[flag[nb] & (nb < owner) & (pending[nb] == pending[owner])]
            flag[chosen] = False
            if clash.size:
                flag[clash] = True
                keep = ~flag[chosen]
                mine = ~flag[owner]
                flag[clash] = False
                chosen, new, owner, nb = chosen[keep], new[keep], owner[mine], nb[mine]
        colors[chosen] = new
        done += chosen.size
        used = max(used, int(new.max()) + 1)
        if used >= give_up_at:
            return None
        open_ = colors[nb] < 0
        nb = nb[open_]
        forbidden[nb * width + colors[owner[open_]]] = True
        # Distinct touched vertices without sorting: the last write to slot wins.
        slot[nb] = np.arange(nb.size)
        touched = nb[slot[nb] == np.arange(nb.size)]
        sat = forbidden.reshape(n, width)[touched].sum(axis=1)
        grown = sat > saturation[touched]
        touched, sat = touched[grown], sat[grown]
        saturation[touched] = sat
        for level in np.unique(sat).tolist():
            levels[level].append(touched[sat == level])
        if sat.size:
            top = max(top, int(sat.max()))
    return None


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


def _greedy_star(adj: sp.csr_matrix, order: np.ndarray) -> np.ndarray:
    """Greedy star colouring of the graph ``adj`` (no self loops) in ``order``."""
    # NOTE: when vertex v gets a colour, forbid
    #   (a) the colour of every coloured neighbour w (proper colouring);
    #   (b) the colour of every coloured x two steps away through an
    #       *uncoloured* w: x and v will then always differ, so w can never be
    #       the middle of a two-coloured path later;
    #   (c) the colour of x (coloured, via a coloured w) when x already has a
    #       neighbour y != w coloured like w: v = x would close the two-coloured
    #       path v-w-x-y.
    # Any path a-b-c-d is then checked when its last vertex is coloured: as an
    # end by (c), as a middle by (b) applied to its two neighbours. The cost is
    # O(n d^3) python steps for maximum degree d.
    n = adj.shape[0]
    indptr = adj.indptr.tolist()
    indices = adj.indices.tolist()
    colors = [-1] * n
    mark = [-1] * (n + 1)  # mark[c] == v: colour c forbidden for v
    for v in order.tolist():
        for k in range(indptr[v], indptr[v + 1]):
            w = indices[k]
            cw = colors[w]
            if cw >= 0:
                mark[cw] = v
            for q in range(indptr[w], indptr[w + 1]):
                x = indices[q]
                cx = colors[x]
                if x == v or cx < 0 or mark[cx] == v:
                    continue
                if cw < 0:
                    mark[cx] = v
                    continue
                for r in range(indptr[x], indptr[x + 1]):
                    y = indices[r]
                    if y != w and colors[y] == cw:
                        mark[cx] = v
                        break
        c = 0
        while mark[c] == v:
            c += 1
        colors[v] = c
    return np.asarray(colors, dtype=np.int64)


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
