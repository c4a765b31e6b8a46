"""Rows over pairs ``j <= k``: the third-derivative kind's row numbering.

Row ``r`` of an ``n``-input result is the pair ``(j, k)``, ``j <= k``, in
row-major order over the upper triangle: ``(0, 0), (0, 1), ..., (0, n-1),
(1, 1), ...``; there are ``n (n + 1) / 2`` rows. Storage reads them back into
the symmetric ``(n, n, n)`` tensor, the maths computes them: both number them here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def pair_count(n: int) -> int:
    """Rows of an ``n``-input result: ``n (n + 1) / 2``."""
    return n * (n + 1) // 2


def pair_of_row(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(j, k)`` with ``j <= k`` of flat rows (integer arrays)."""
    import numpy as np

    rows = np.asarray(rows, dtype=np.int64)
    # first row of j: j n - j (j - 1) / 2; invert the quadratic, then fix rounding by one
    j = np.floor(((2 * n + 1) - np.sqrt((2.0 * n + 1) ** 2 - 8.0 * rows)) / 2).astype(np.int64)
    j = np.clip(j, 0, n - 1)
    j = np.where(_first(j, n) > rows, j - 1, j)
    j = np.where((j + 1 < n) & (_first(j + 1, n) <= rows), j + 1, j)
    return j, j + rows - _first(j, n)


def row_of_pair(j: np.ndarray, k: np.ndarray, n: int) -> np.ndarray:
    """The flat row of pairs ``(j, k)``, in either order."""
    import numpy as np

    j, k = np.minimum(j, k), np.maximum(j, k)
    return _first(j, n) + (k - j)


def _first(j: np.ndarray, n: int) -> np.ndarray:
    return j * n - j * (j - 1) // 2
