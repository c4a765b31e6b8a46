"""Pictures of a Jacobian: a downsampled heatmap or spy plot with norm profiles.

Both plots are computed streaming: a dense matrix arrives as row blocks and is
reduced block by block to at most ``max_pixels x max_pixels`` pixels (each
pixel the max ``|J_ij|`` over the entries it covers) plus per-pixel row and
column norm ranges, so the full matrix is never held. Matplotlib is imported
inside the functions (``jacpipe --help`` stays fast) and only its
object-oriented API is used (no pyplot, no global backend switch): the file is
written as PNG, SVG or PDF by its extension, whatever the user's backend.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from scipy.sparse import csr_matrix

# NOTE: the log colour scale shows at most this many decades below the
# largest value; smaller non-zero values take the lowest colour (the
# colourbar's "extend" arrow says so).
_DECADES = 12
_SPY_COLOR = "#1f3b73"


@dataclass
class _Reduction:
    """A matrix reduced to pixels, with row/column norm ranges per pixel."""

    image: np.ndarray  # (H, W) max |J| per pixel block
    row_edges: np.ndarray  # (H + 1,) pixel i covers rows [row_edges[i], row_edges[i+1])
    col_edges: np.ndarray  # (W + 1,)
    row_norm_max: np.ndarray  # (H,) max / min of the row 2-norms inside each pixel row
    row_norm_min: np.ndarray
    col_norm_max: np.ndarray  # (W,)
    col_norm_min: np.ndarray
    rows_seen: int
    nonfinite: int


def pixel_edges(size: int, max_pixels: int) -> np.ndarray:
    """Integer edges splitting ``range(size)`` into ``min(size, max_pixels)`` near-equal bins.

    Raises:
        ValueError: ``size < 1`` or ``max_pixels < 1``.
    """
    import numpy as np

    if size < 1 or max_pixels < 1:
        raise ValueError(
            f"pixel_edges: expected size >= 1, max_pixels >= 1, got {size}, {max_pixels}"
        )
    # NOTE: consecutive linspace points are >= 1 apart, so rounding keeps every bin non-empty.
    return np.linspace(0, size, min(size, max_pixels) + 1).round().astype(np.int64)


def blockmax_image(
    blocks: Iterable[tuple[int, np.ndarray]],
    shape: tuple[int, int],
    max_pixels: int = 512,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduce a matrix given as row blocks to an image of block max ``|J_ij|``.

    Pixel ``(a, b)`` holds ``max |J[i, j]|`` over rows
    ``row_edges[a] <= i < row_edges[a + 1]`` and columns
    ``col_edges[b] <= j < col_edges[b + 1]``; NaN if any of those is NaN, 0
    where no block covered it. Blocks may arrive in any order.

    Args:
        blocks: ``(start_row, block)`` pairs, ``block`` of shape ``(r, n)``.
        shape: ``(m, n)`` of the whole matrix.
        max_pixels: at most this many pixels along each side.

    Returns:
        ``(image, row_edges, col_edges)``: ``image`` is
        ``(len(row_edges) - 1, len(col_edges) - 1)`` float64.

    Raises:
        ValueError: a block of the wrong width or outside ``[0, m)``.
    """
    red = _reduce_dense(blocks, shape, max_pixels)
    return red.image, red.row_edges, red.col_edges


def _reduce_dense(
    blocks: Iterable[tuple[int, np.ndarray]], shape: tuple[int, int], max_pixels: int
) -> _Reduction:
    import numpy as np

    m, n = (int(s) for s in shape)
    row_edges, col_edges = pixel_edges(m, max_pixels), pixel_edges(n, max_pixels)
    h, w = len(row_edges) - 1, len(col_edges) - 1
    image = np.zeros((h, w))
    row_max = np.zeros(h)
    row_min = np.full(h, np.inf)
    col_sumsq = np.zeros(n)
    rows_seen = nonfinite = 0
    for start, block in blocks:
        a = np.abs(np.asarray(block, dtype=np.float64))
        if a.ndim != 2 or a.shape[1] != n:
            raise ValueError(f"plot: block at row {start} has shape {a.shape}, expected (r, {n})")
        stop = start + a.shape[0]
        if start < 0 or stop > m:
            raise ValueError(f"plot: block rows [{start}, {stop}) fall outside [0, {m})")
        if a.shape[0] == 0:
            continue
        rows_seen += a.shape[0]
        nonfinite += int(a.size - np.count_nonzero(np.isfinite(a)))
        per_col = np.maximum.reduceat(a, col_edges[:-1], axis=1)  # (r, w)
        bins = np.searchsorted(row_edges, np.arange(start, stop), side="right") - 1
        firsts = np.flatnonzero(np.diff(bins, prepend=-1))  # block rows starting a new pixel
        pix = bins[firsts]
        image[pix] = np.maximum(image[pix], np.maximum.reduceat(per_col, firsts, axis=0))
        norms = np.sqrt(np.einsum("ij,ij->i", a, a))
        row_max[pix] = np.fmax(row_max[pix], np.fmax.reduceat(norms, firsts))
        row_min[pix] = np.fmin(row_min[pix], np.fmin.reduceat(norms, firsts))
        col_sumsq += np.einsum("ij,ij->j", a, a)
    row_min[np.isinf(row_min)] = 0.0
    col_norms = np.sqrt(col_sumsq)
    return _Reduction(
        image=image,
        row_edges=row_edges,
        col_edges=col_edges,
        row_norm_max=row_max,
        row_norm_min=row_min,
        col_norm_max=np.fmax.reduceat(col_norms, col_edges[:-1]),
        col_norm_min=np.fmin.reduceat(col_norms, col_edges[:-1]),
        rows_seen=rows_seen,
        nonfinite=nonfinite,
    )


def plot_dense(
    blocks: Iterable[tuple[int, np.ndarray]],
    shape: tuple[int, int],
    path: str | Path,
    *,
    max_pixels: int = 512,
    title: str = "",
    samples: int = 0,
) -> Path:
    """Write a log-scaled heatmap of ``|J|`` with row and column norm profiles.

    Args:
        blocks: ``(start_row, block)`` pairs, ``block`` of shape ``(r, n)``,
            read once (streamed).
        shape: ``(m, n)`` of the matrix.
        path: the file to write (PNG, SVG or PDF by extension; PNG otherwise).
        max_pixels: the heatmap has at most this many pixels per side; each
            pixel shows the max ``|J_ij|`` of the block it covers.
        title: first line of the figure title.
        samples: a batched result's number of samples ``B`` (its ``m`` rows
            are ``B`` stacked samples): lines mark the sample boundaries.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: a malformed block (see :func:`blockmax_image`).
    """
    import numpy as np

    m, n = (int(s) for s in shape)
    red = _reduce_dense(blocks, (m, n), max_pixels)
    ph = (m + len(red.row_edges) - 2) // (len(red.row_edges) - 1)
    pw = (n + len(red.col_edges) - 2) // (len(red.col_edges) - 1)
    pixel = "1 pixel = 1 entry" if ph == pw == 1 else f"1 pixel ≤ {ph}×{pw} entries (max |J|)"
    subtitle = f"{m:,} × {n:,} dense, {pixel}"
    subtitle += _samples_note(m, samples)
    if red.rows_seen < m:
        subtitle += f", only {red.rows_seen:,} rows present"
    if red.nonfinite:
        subtitle += f", {red.nonfinite:,} non-finite {_plural(red.nonfinite, 'entry')} (red)"
    fig, ax, top, right, cax, corner = _figure(m, n, title, subtitle)

    img = red.image
    finite_pos = img[np.isfinite(img) & (img > 0)]
    if finite_pos.size == 0:
        ax.text(
            0.5,
            0.5,
            "no non-zero finite entry",
            transform=ax.transAxes,
            ha="center",
            va="center",
            fontsize=12,
            color="0.3",
        )
        _heatmap(ax, cax, img, red, cmap=None)
    else:
        import matplotlib

        vmax, vmin, extend = float(finite_pos.max()), float(finite_pos.min()), "neither"
        if vmin < vmax * 10.0**-_DECADES:
            vmin, extend = vmax * 10.0**-_DECADES, "min"
        if vmin == vmax:
            vmin, vmax = vmin / 10.0, vmax * 10.0
        _heatmap(
            ax,
            cax,
            img,
            red,
            cmap=matplotlib.colormaps["viridis"],
            vmin=vmin,
            vmax=vmax,
            extend=extend,
            label="max |J_ij| in pixel (log scale)",
        )
    _sample_boundaries(ax, m, n, samples)
    _profiles(top, right, corner, red)
    return _save(fig, path)


#: Above this many samples the boundary lines would hide the picture: only the
#: subtitle names them.
_MAX_BOUNDARIES = 64


def _samples_note(rows: int, samples: int) -> str:
    """The subtitle's words for a batched stack (empty for one matrix)."""
    if samples <= 1 or rows % samples:
        return ""
    drawn = "boundaries drawn" if samples <= _MAX_BOUNDARIES else "too many to draw boundaries"
    return f"\n{samples:,} samples of {rows // samples:,} rows stacked ({drawn})"


def _sample_boundaries(ax: Any, rows: int, cols: int, samples: int) -> None:
    """Crimson lines between the stacked samples of a batched result (heatmap row coordinates)."""
    if samples <= 1 or rows % samples or samples > _MAX_BOUNDARIES:
        return
    step = rows // samples
    ax.hlines([step * i for i in range(1, samples)], 0, cols, colors="crimson", linewidths=1.2,
              gid="sample-boundaries")


def plot_sparse(
    matrix: csr_matrix | Any,
    path: str | Path,
    *,
    max_pixels: int = 512,
    title: str = "",
) -> Path:
    """Write a spy plot of a sparse matrix with row and column norm profiles.

    Small matrices get one pixel per entry (stored or not). Larger ones are
    downsampled: each pixel's colour is the fraction of its block that is
    stored, on a log scale, so a thin band stays visible.

    Args:
        matrix: a ``scipy.sparse`` matrix or pattern (converted to float64
            CSR); explicitly stored zeros count as stored.
        path: the file to write (PNG, SVG or PDF by extension; PNG otherwise).
        max_pixels: at most this many pixels per side.
        title: first line of the figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: a matrix with no rows or no columns.
    """
    import numpy as np
    import scipy.sparse as sp

    csr = sp.csr_matrix(matrix)
    if csr.dtype != np.float64:  # e.g. a boolean sparsity pattern
        csr = csr.astype(np.float64)
    m, n = csr.shape
    if m < 1 or n < 1:
        raise ValueError(f"plot_sparse: empty matrix of shape {(m, n)}")
    row_edges, col_edges = pixel_edges(m, max_pixels), pixel_edges(n, max_pixels)
    h, w = len(row_edges) - 1, len(col_edges) - 1
    counts = np.zeros(h * w, dtype=np.int64)
    # Count stored entries per pixel, a few million entries at a time.
    step = max(1, 4_000_000 * m // max(csr.nnz, 1))
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        ptr = csr.indptr[r0 : r1 + 1]
        rows = np.repeat(np.arange(r0, r1), np.diff(ptr))
        cols = csr.indices[ptr[0] : ptr[-1]]
        rb = np.searchsorted(row_edges, rows, side="right") - 1
        cb = np.searchsorted(col_edges, cols, side="right") - 1
        counts += np.bincount(rb * w + cb, minlength=h * w)
    area = np.outer(np.diff(row_edges), np.diff(col_edges)).astype(np.float64)
    occupancy = counts.reshape(h, w) / area

    sq = csr.multiply(csr) if csr.nnz else csr
    row_norms = np.sqrt(np.asarray(sq.sum(axis=1)).ravel())
    col_norms = np.sqrt(np.asarray(sq.sum(axis=0)).ravel())
    red = _Reduction(
        image=occupancy,
        row_edges=row_edges,
        col_edges=col_edges,
        row_norm_max=np.fmax.reduceat(row_norms, row_edges[:-1]),
        row_norm_min=np.fmin.reduceat(row_norms, row_edges[:-1]),
        col_norm_max=np.fmax.reduceat(col_norms, col_edges[:-1]),
        col_norm_min=np.fmin.reduceat(col_norms, col_edges[:-1]),
        rows_seen=m,
        nonfinite=int(csr.nnz - np.count_nonzero(np.isfinite(csr.data))),
    )
    density = csr.nnz / (m * n)
    one_to_one = h == m and w == n
    pixel = "1 pixel = 1 entry, blue = stored" if one_to_one else "colour = stored fraction"
    subtitle = f"{m:,} × {n:,} sparse, nnz {csr.nnz:,}, density {density:.3g}, {pixel}"
    fig, ax, top, right, cax, corner = _figure(m, n, title, subtitle)
    positive = occupancy[occupancy > 0]
    if one_to_one or positive.size == 0 or positive.min() == positive.max():
        _heatmap(ax, cax, occupancy, red, cmap=None)
    else:
        import matplotlib
        from matplotlib.colors import ListedColormap

        # NOTE: Blues from 30 %, so even a nearly empty pixel stands out from white.
        blues = ListedColormap(matplotlib.colormaps["Blues"](np.linspace(0.3, 1.0, 256)))
        _heatmap(
            ax,
            cax,
            occupancy,
            red,
            cmap=blues,
            vmin=float(positive.min()),
            vmax=1.0,
            label="stored fraction of pixel block (log scale)",
        )
    _profiles(top, right, corner, red)
    return _save(fig, path)


# ---------------------------------------------------------------------------
# Figure pieces
# ---------------------------------------------------------------------------


def _figure(m: int, n: int, title: str, subtitle: str) -> tuple[Any, ...]:
    """A figure and its axes: main, top profile, right profile, colourbar, corner."""
    from matplotlib.figure import Figure

    main_w = 6.4
    main_h = min(7.0, max(3.6, main_w * m / n))  # follow the matrix's shape, within limits
    fig = Figure(figsize=(main_w + 3.6, main_h + 2.6), dpi=100, layout="constrained")
    grid = fig.add_gridspec(2, 3, width_ratios=[main_w, 1.6, 0.22], height_ratios=[1.4, main_h])
    ax = fig.add_subplot(grid[1, 0])
    top = fig.add_subplot(grid[0, 0], sharex=ax)
    right = fig.add_subplot(grid[1, 1], sharey=ax)
    cax = fig.add_subplot(grid[1, 2])
    corner = fig.add_subplot(grid[0, 1:])
    corner.axis("off")
    fig.suptitle(f"{title}\n{subtitle}" if title else subtitle, fontsize=11)
    return fig, ax, top, right, cax, corner


def _heatmap(
    ax: Any,
    cax: Any,
    img: np.ndarray,
    red: _Reduction,
    *,
    cmap: Any | None,
    vmin: float = 0.1,
    vmax: float = 10.0,
    extend: str = "neither",
    label: str = "",
) -> None:
    """Draw ``img`` over the real index ranges, log colour; ``cmap=None``: one-colour spy."""
    import numpy as np
    from matplotlib.colors import ListedColormap, LogNorm
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    m, n = int(red.row_edges[-1]), int(red.col_edges[-1])
    extent = (0, n, m, 0)
    # NOTE: zeros are masked (drawn white); NaNs are masked too and get a red overlay.
    masked = np.ma.masked_where(~(img > 0) | ~np.isfinite(img), img)
    if cmap is None:
        spy = ListedColormap([_SPY_COLOR]).with_extremes(bad="white")
        ax.imshow(masked, cmap=spy, extent=extent, aspect="auto", interpolation="nearest")
        cax.axis("off")
    else:
        cmap = cmap.with_extremes(bad="white", under=cmap(0.0), over=cmap(1.0))
        im = ax.imshow(
            masked,
            cmap=cmap,
            norm=LogNorm(vmin=vmin, vmax=vmax),
            extent=extent,
            aspect="auto",
            interpolation="nearest",
        )
        cbar = ax.figure.colorbar(im, cax=cax, extend=extend)
        notes = ["white = 0"] if np.any(img == 0) else []
        if np.any(np.isnan(img)):
            notes.append("red = NaN")
        cbar.set_label(label + (f"; {', '.join(notes)}" if notes else ""))
    nan = np.isnan(img)
    if nan.any():
        overlay = np.zeros(img.shape + (4,))
        overlay[nan] = (0.85, 0.1, 0.1, 1.0)
        ax.imshow(overlay, extent=extent, aspect="auto", interpolation="nearest")
        if nan.sum() <= 200:  # a lone NaN pixel is too small to see: mark it
            a, b = np.nonzero(nan)
            rc = (red.row_edges[a] + red.row_edges[a + 1]) / 2
            cc = (red.col_edges[b] + red.col_edges[b + 1]) / 2
            ax.scatter(
                cc,
                rc,
                s=60,
                marker="o",
                facecolors="none",
                edgecolors="red",
                lw=1.5,
                clip_on=False,
                zorder=5,
            )
    index = FuncFormatter(lambda v, _: f"{int(round(v)):,}")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        axis.set_major_formatter(index)
    ax.set_xlim(0, n)
    ax.set_ylim(m, 0)
    ax.set_xlabel("column j (flat input index)")
    ax.set_ylabel("row i (flat output index)")


def _profiles(top: Any, right: Any, corner: Any, red: _Reduction) -> None:
    """Row-norm profile on the right, column-norm profile on top (min-max band per pixel).

    A log axis is used when the non-zero norms span more than two decades,
    else a linear one whose limits come from the data (:func:`_linear_limits`).
    """
    import numpy as np
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

    def band(ax: Any, lo: np.ndarray, hi: np.ndarray, edges: np.ndarray, horizontal: bool) -> None:
        finite = np.concatenate([lo, hi])
        pos = finite[np.isfinite(finite) & (finite > 0)]
        log = pos.size > 0 and pos.max() > 100 * pos.min()
        lo = np.where(np.isfinite(lo), lo, np.nan)
        hi = np.where(np.isfinite(hi), hi, np.nan)
        if log:  # zeros sit on the axis floor, half the smallest non-zero norm
            floor = pos.min() / 2
            lo = np.where(np.isnan(lo) | (lo > 0), lo, floor)
            hi = np.where(np.isnan(hi) | (hi > 0), hi, floor)
        orient = "horizontal" if horizontal else "vertical"
        ax.stairs(
            hi,
            edges,
            baseline=lo,
            fill=True,
            color="tab:blue",
            alpha=0.3,
            orientation=orient,
            label="min–max of the norms in a pixel row/column",
        )
        ax.stairs(
            hi,
            edges,
            baseline=None,
            color="tab:blue",
            lw=1.0,
            orientation=orient,
            label="max of the norms in a pixel row/column",
        )
        axis = ax.xaxis if horizontal else ax.yaxis
        if log:
            (ax.set_xscale if horizontal else ax.set_yscale)("log")
            axis.set_major_locator(LogLocator(numticks=4))
            axis.set_minor_formatter(NullFormatter())
        else:
            (ax.set_xlim if horizontal else ax.set_ylim)(*_linear_limits(lo, hi))
            axis.set_major_locator(MaxNLocator(nbins=3))
        ax.grid(True, which="major", alpha=0.3)

    band(right, red.row_norm_min, red.row_norm_max, red.row_edges, horizontal=True)
    right.set_xlabel("row norm ‖J[i, :]‖₂")
    right.tick_params(labelleft=False)
    band(top, red.col_norm_min, red.col_norm_max, red.col_edges, horizontal=False)
    top.set_ylabel("column norm\n‖J[:, j]‖₂")
    top.tick_params(labelbottom=False)
    handles, labels = right.get_legend_handles_labels()
    corner.legend(
        handles,
        [lb.replace(" in a pixel row/column", "\nper pixel row/column") for lb in labels],
        loc="center",
        fontsize=8,
        frameon=False,
        title="norm profiles",
        title_fontsize=9,
    )


def _linear_limits(lo: np.ndarray, hi: np.ndarray) -> tuple[float, float]:
    """Axis limits of a linear norm profile: the data's range with a margin.

    Norms that all lie in ``[9.5, 10]`` fill the panel instead of sitting
    against its far edge on ``[0, 10.8]``; a range that reaches 0 shows 0.
    """
    import numpy as np

    both = np.concatenate([lo, hi])
    both = both[np.isfinite(both)]
    if both.size == 0:
        return 0.0, 1.0
    low, high = float(both.min()), float(both.max())
    pad = 0.08 * (high - low) if high > low else 0.08 * abs(high) or 1.0
    return max(low - pad, 0.0), high + pad


def _plural(count: int, word: str) -> str:
    return word if count == 1 else ("entries" if word == "entry" else word + "s")


def plot_points(coords: np.ndarray | None, values: np.ndarray, path: str | Path, *,
                title: str = "", label: str = "value") -> Path:
    """A per-point operator over its points: a curve (1-D), a coloured scatter (2-D, 3-D).

    Points of more than three coordinates (``coords`` None) are drawn against
    their index. Only the first output of ``fn`` is drawn when it has several.

    Args:
        coords: ``(P, D)`` point coordinates with ``D <= 3``, or None.
        values: ``(P, k)`` the operator's values.
        path: the file (``.png``, ``.svg``, ``.pdf``).
        title: the figure's title.
        label: what the values are (the colour bar's or axis' label).

    Returns:
        The path written.
    """
    import numpy as np
    from matplotlib.figure import Figure

    v = np.asarray(values, dtype=np.float64).reshape(len(values), -1)[:, 0]
    d = 0 if coords is None else coords.reshape(len(v), -1).shape[1]
    fig = Figure(figsize=(7.2, 5.6), dpi=100, layout="constrained")
    ax = fig.add_subplot(projection="3d" if d == 3 else None)
    if d in (0, 1):
        xs = np.arange(len(v)) if d == 0 else coords.reshape(-1)
        order = np.argsort(xs, kind="stable")
        ax.plot(xs[order], v[order], ".-" if d == 1 else ".", markersize=3, linewidth=0.8)
        ax.set_xlabel("point" if d == 0 else "x")
        ax.set_ylabel(label)
    else:
        c = coords.reshape(len(v), d)
        art = ax.scatter(*(c[:, i] for i in range(d)), c=v, s=12, cmap="viridis")
        for i, name in enumerate("xyz"[:d]):
            getattr(ax, f"set_{name}label")(f"x{i}")
        fig.colorbar(art, ax=ax, label=label, shrink=0.8)
    fig.suptitle(f"{title}\n{len(v):,} points", fontsize=11)
    return _save(fig, path)


def check_plot_folder(path: str | Path) -> None:
    """Refuse a picture whose folder does not exist (no folders are created for it).

    Raises:
        JacpipeError: the folder of ``path`` is missing or not a folder.
    """
    from pipeline.core.errors import JacpipeError

    folder = Path(path).parent
    if folder.exists() and not folder.is_dir():
        raise JacpipeError(f"--plot {path}: cannot write it ({folder} is a file, not a folder)")
    if not folder.is_dir():
        raise JacpipeError(
            f"--plot {path}: the folder {folder} does not exist (jacpipe creates no folders "
            "for a picture); create it first or choose another path"
        )


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    check_plot_folder(out)
    fmt = out.suffix.lower().lstrip(".") or "png"
    fig.savefig(out, format=fmt if fmt in ("png", "svg", "pdf") else "png")
    return out
