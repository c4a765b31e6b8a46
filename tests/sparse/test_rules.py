"""``pipeline.sparse.rules`` pattern helpers, against SciPy's own row indexing."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from pipeline.sparse.rules import take_rows


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
