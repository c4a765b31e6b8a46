"""``pipeline.sparse.rules`` pattern helpers, against SciPy's own row indexing."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.sparse.rules import Context, take_rows, union


def _reference(p: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    dense = p.toarray()
    return np.stack([dense[r] if r >= 0 else np.zeros(p.shape[1], bool) for r in rows])


def test_take_rows_with_empty_and_repeated_rows_equals_scipy():
    rng = np.random.default_rng(0)
    # at most one entry per row (the fast path, asked twice: its remembered columns),
    # then a general pattern
    one = sp.csr_matrix((np.ones(5, bool), ([0, 2, 3, 5, 6], [4, 0, 4, 1, 3])), shape=(8, 6))
    general = sp.random(8, 6, density=0.4, random_state=rng, format="csr") != 0
    rows = np.array([-1, 3, 3, 0, 1, -1, 7, 6, 2, 5])
    for p in (one, one, general):
        got = take_rows(p, rows, p.shape[1])
        np.testing.assert_array_equal(got.toarray(), _reference(p, rows))
        again = take_rows(got, np.array([9, -1, 1, 0]), p.shape[1])  # a taken pattern, taken
        np.testing.assert_array_equal(again.toarray(), _reference(got, np.array([9, -1, 1, 0])))
    assert getattr(take_rows(one, rows, 6), "_jacpipe_at_most_one", False)


def test_the_fast_path_builds_the_index_dtype_scipy_would_pick():
    """At most one entry per row: the arrays are made in scipy's own choice (int32 here), so
    the matrix equals the one scipy builds from int64 arrays (NOTE: [index dtype])."""
    one = sp.csr_matrix((np.ones(4, bool), ([0, 1, 3, 4], [2, 0, 5, 2])), shape=(5, 6))
    rows = np.array([4, -1, 0, 3, 3, 1, -1])
    got = take_rows(one, rows, 6)
    ref = _reference(one, rows)
    scipy_own = sp.csr_matrix((np.ones(ref.sum(), bool), np.nonzero(ref)[1].astype(np.int64),
                               np.r_[0, ref.sum(1).cumsum()].astype(np.int64)), shape=ref.shape)
    assert got.indices.dtype == got.indptr.dtype == scipy_own.indices.dtype == np.int32
    np.testing.assert_array_equal(got.indptr, scipy_own.indptr)
    np.testing.assert_array_equal(got.indices, scipy_own.indices)
    np.testing.assert_array_equal(take_rows(got, np.array([6, 0, -1]), 6).toarray(),
                                  _reference(got, np.array([6, 0, -1])))


def test_a_union_skips_a_part_it_already_holds_and_equals_the_plain_union():
    """NOTE: [union parts]: ``(a + b) + a`` is ``a + b`` itself; a fresh pattern with the
    same entries as a part is merged as usual (only the very object counts)."""
    rng = np.random.default_rng(1)
    a, b, c = (sp.random(7, 9, density=0.3, random_state=rng, format="csr") != 0
               for _ in range(3))
    ab = union([a, b])
    assert union([ab, a]) is ab and union([b, ab]) is ab
    abc = union([ab, c])
    assert union([abc, a]) is abc  # held through ab
    np.testing.assert_array_equal(abc.toarray(), (a.toarray() | b.toarray() | c.toarray()))
    twin = a.copy()
    again = union([ab, twin])
    assert again is not ab
    np.testing.assert_array_equal(again.toarray(), ab.toarray())


def test_the_index_maps_kept_by_the_context_are_the_same_maps():
    ctx = Context(6, 6, "global", None, None)
    t = torch.zeros(2, 3)
    first = ctx.index_map(t, 4)
    assert ctx.index_map(torch.ones(2, 3), 4) is first
    torch.testing.assert_close(first, torch.arange(5, 11).reshape(2, 3))
    torch.testing.assert_close(ctx.index_map(t), torch.arange(1, 7).reshape(2, 3))
    for k in range(6):  # a few kept, the oldest dropped
        ctx.index_map(torch.zeros(k + 1))
    assert ctx.index_map(t, 4) is not first
