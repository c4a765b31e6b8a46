"""Streamed Jacobian pictures (pipeline/analysis/plot.py): the reduction and the PNG files."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline.analysis.plot import blockmax_image, pixel_edges, plot_dense, plot_sparse
from pipeline.core.errors import JacpipeError


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails unless it is a PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert data[12:16] == b"IHDR"
    assert data[-8:-4] == b"IEND", "truncated PNG"
    return struct.unpack(">II", data[16:24])


def _row_blocks(a: np.ndarray, sizes=(5, 0, 11, 3)):
    """Uneven ``(start, block)`` pairs, yielded out of order (shards finish in any order)."""
    out, i, j = [], 0, 0
    while i < a.shape[0]:
        r = sizes[j % len(sizes)]
        out.append((i, a[i : i + r]))
        i, j = i + r, j + 1
    return iter(out[::-1])


def test_pixel_edges_cover_and_are_nonempty():
    for size, px in [(1, 512), (37, 8), (1000, 512), (513, 512), (10, 10)]:
        edges = pixel_edges(size, px)
        assert edges[0] == 0 and edges[-1] == size
        assert len(edges) - 1 == min(size, px)
        assert np.all(np.diff(edges) >= 1)
        assert np.diff(edges).max() - np.diff(edges).min() <= 1
    with pytest.raises(ValueError):
        pixel_edges(0, 5)


def test_blockmax_image_equals_direct_block_max_abs():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 23)) * np.logspace(0, 3, 23)
    image, row_edges, col_edges = blockmax_image(_row_blocks(a), a.shape, max_pixels=8)
    assert image.shape == (8, 8)
    direct = np.array(
        [
            [
                np.abs(a[r0:r1, c0:c1]).max()
                for c0, c1 in zip(col_edges[:-1], col_edges[1:], strict=True)
            ]
            for r0, r1 in zip(row_edges[:-1], row_edges[1:], strict=True)
        ]
    )
    np.testing.assert_array_equal(image, direct)
    # No downsampling needed: the image is |A| itself.
    image, _, _ = blockmax_image(_row_blocks(a), a.shape, max_pixels=100)
    np.testing.assert_array_equal(image, np.abs(a))


def test_blockmax_image_nan_and_missing_rows():
    a = np.ones((6, 4))
    a[1, 2] = np.nan
    image, _, _ = blockmax_image([(0, a[:3])], a.shape, max_pixels=2)  # rows 3..5 missing
    assert np.isnan(image[0, 1]) and image[0, 0] == 1.0
    np.testing.assert_array_equal(image[1], [0.0, 0.0])


def test_blockmax_image_rejects_bad_blocks():
    with pytest.raises(ValueError, match=r"expected \(r, 4\)"):
        blockmax_image([(0, np.ones((2, 5)))], (4, 4))
    with pytest.raises(ValueError, match="outside"):
        blockmax_image([(3, np.ones((2, 4)))], (4, 4))


def test_plot_dense_writes_a_readable_png(tmp_path):
    rng = np.random.default_rng(1)
    m, n = 1500, 900
    a = rng.standard_normal((m, n)) * np.logspace(-4, 0, n)
    a[100:120] = 0.0
    a[7, 7] = np.nan
    consumed = []

    def blocks():  # a one-shot generator: plot_dense must stream it once
        for s in range(0, m, 256):
            consumed.append(s)
            yield s, a[s : s + 256]

    (tmp_path / "sub").mkdir()
    out = plot_dense(blocks(), (m, n), tmp_path / "sub" / "dense.png", max_pixels=300, title="t")
    assert out == tmp_path / "sub" / "dense.png"
    assert consumed == list(range(0, m, 256))
    w, h = _png_size(out)
    assert 700 <= w <= 1400 and 500 <= h <= 1200
    assert out.stat().st_size > 20_000  # an image, not a blank canvas


def test_plot_dense_all_zero_and_tiny(tmp_path):
    out = plot_dense([(0, np.zeros((3, 2)))], (3, 2), tmp_path / "zero.png")
    assert _png_size(out)[0] >= 700
    out = plot_dense([(0, np.array([[2.0]]))], (1, 1), tmp_path / "one.png")
    assert _png_size(out)[0] >= 700


def test_a_plot_into_a_missing_folder_creates_no_folder(tmp_path):
    with pytest.raises(JacpipeError, match="the folder .* does not exist"):
        plot_dense([(0, np.ones((2, 2)))], (2, 2), tmp_path / "a" / "b" / "x.png")
    assert not (tmp_path / "a").exists()


def test_plot_sparse_small_and_banded(tmp_path):
    small = sp.random(60, 40, density=0.05, random_state=0, format="csr")
    out = plot_sparse(small, tmp_path / "small.png")
    w, h = _png_size(out)
    assert 700 <= w <= 1400 and 500 <= h <= 1200

    n = 6000
    band = sp.diags(
        [np.full(n - abs(k), 1.0 + k) for k in range(-2, 3)],
        range(-2, 3),
        shape=(n, n),
        format="csr",
    )
    out = plot_sparse(band, tmp_path / "band.png", max_pixels=256, title="banded")
    w, h = _png_size(out)
    assert 700 <= w <= 1400 and 500 <= h <= 1200
    # A boolean sparsity pattern, and an empty matrix (no stored entries), still plot.
    out = plot_sparse(band.astype(bool), tmp_path / "pattern.png", max_pixels=64)
    assert _png_size(out)[0] >= 700
    out = plot_sparse(sp.csr_matrix((10, 10)), tmp_path / "empty.png")
    assert _png_size(out)[0] >= 700


def _captured(monkeypatch) -> list:
    """Figures handed to ``_save`` (nothing is written)."""
    import pipeline.analysis.plot as plot

    figs: list = []
    monkeypatch.setattr(plot, "_save", lambda fig, path: figs.append(fig) or Path(path))
    return figs


def _axis(fig, label: str):
    return next(a for a in fig.axes if label in (a.get_xlabel() + a.get_ylabel()))


def test_the_row_norm_panel_takes_its_limits_from_the_data(tmp_path, monkeypatch):
    """Norms in [9.5, 10] used to be drawn on [0, 10.8], squashed against the right edge."""
    figs = _captured(monkeypatch)
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 30))
    a *= (9.5 + 0.5 * rng.random((40, 1))) / np.linalg.norm(a, axis=1, keepdims=True)
    plot_dense([(0, a)], a.shape, tmp_path / "x.png")
    lo, hi = _axis(figs[0], "row norm").get_xlim()
    norms = np.linalg.norm(a, axis=1)
    assert lo > 9.0 and lo < norms.min() and norms.max() < hi < 10.3, (lo, hi)


def test_a_batched_plot_draws_the_sample_boundaries(tmp_path, monkeypatch):
    figs = _captured(monkeypatch)
    a = np.ones((5 * 6, 4))
    plot_dense([(0, a)], a.shape, tmp_path / "b.png", samples=5, title="t")
    lines = [c for ax in figs[0].axes for c in ax.collections
             if c.get_gid() == "sample-boundaries"]
    assert len(lines) == 1
    ys = sorted({round(float(seg[0][1])) for seg in lines[0].get_segments()})
    assert ys == [6, 12, 18, 24]
    assert "5 samples of 6 rows" in figs[0]._suptitle.get_text()
