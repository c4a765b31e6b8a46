"""A result folder as a ``scipy.sparse.linalg.LinearOperator``, streamed from its parts.

Each product reads the parts once, one block at a time (a dense row group, or
one sparse part as CSR): ``J @ X`` fills its output rows block by block,
``J.T @ Y`` accumulates ``block.T @ Y[rows]``. Memory is O(block + m + n);
the matrix is never held whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np  # noqa: TID253 - imported only by as_linear_operator, lazily
from scipy.sparse.linalg import LinearOperator  # noqa: TID253 - idem

from pipeline.core.kinds import layout_of


class JacobianOperator(LinearOperator):
    """``J`` of an opened result (``JacobianResult.as_linear_operator``).

    Args:
        result: an opened result (:class:`pipeline.store.reader.JacobianResult`).
        dtype: arithmetic dtype; default the result's.

    NOTE: products run in ``dtype``: a float64 vector against a float32 result
    is cast to float32 (numpy would otherwise upcast every block, a copy that
    halves the throughput); ``rmatmat`` accumulates across blocks in float64.
    """

    def __init__(self, result: Any, *, dtype: Any = None) -> None:
        self.result = result
        super().__init__(np.dtype(dtype or result.dtype), result.shape)

    def _blocks(self) -> Iterator[tuple[Any, Any]]:
        """``(rows, block)`` over the whole matrix: dense arrays or CSR pieces."""
        if not layout_of(self.result.layout).fixed_width:
            for index, start, stop in self.result.plan:
                del index
                rows = np.arange(start, stop)
                yield rows, self.result.read_sparse(rows, verify=False).astype(self.dtype)
        else:
            for rows, block in self.result.iter_blocks(verify=False):
                yield rows, block.astype(self.dtype, copy=False)

    def _matmat(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x).astype(self.dtype, copy=False)
        out = np.zeros((self.shape[0],) + x.shape[1:], dtype=np.result_type(self.dtype, x))
        for rows, block in self._blocks():
            out[rows] = block @ x
        return out

    def _rmatmat(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y).astype(self.dtype, copy=False)
        acc = np.zeros((self.shape[1],) + y.shape[1:], dtype=np.float64)
        for rows, block in self._blocks():
            acc += block.T @ y[rows]
        return acc.astype(np.result_type(self.dtype, y), copy=False)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.asarray(x).reshape(-1))

    def _rmatvec(self, y: np.ndarray) -> np.ndarray:
        return self._rmatmat(np.asarray(y).reshape(-1))

    def _adjoint(self) -> LinearOperator:
        return LinearOperator(
            dtype=self.dtype, shape=(self.shape[1], self.shape[0]),
            matvec=self._rmatvec, rmatvec=self._matvec,
            matmat=self._rmatmat, rmatmat=self._matmat,
        )
