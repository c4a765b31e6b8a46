"""The third-derivative kind's rows over pairs j <= k (pipeline.core.pairs)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.pairs import pair_count, pair_of_row, row_of_pair


@pytest.mark.parametrize("n", [1, 2, 5, 30, 1001])
def test_pairs_number_the_upper_triangle_row_by_row(n):
    j, k = pair_of_row(np.arange(pair_count(n)), n)
    tj, tk = np.triu_indices(n)
    np.testing.assert_array_equal(j, tj)
    np.testing.assert_array_equal(k, tk)
    np.testing.assert_array_equal(row_of_pair(k, j, n), np.arange(pair_count(n)))
