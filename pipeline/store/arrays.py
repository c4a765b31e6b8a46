"""NumPy to Arrow and back for plain numeric columns, without pyarrow's pandas probe.

NOTE: [Arrow without pandas]
    ``pa.array(ndarray)`` and ``Array.to_numpy()`` first ask pyarrow's pandas
    shim whether the object is a pandas one, and the shim imports pandas to
    answer: 0.25 s of a fresh process on a quiet 2-core machine, more under
    load, paid by every Ray worker on its first write and by the driver on its
    first read, though no pandas object is ever involved. Every column jacpipe
    writes is a 1-D numeric array without nulls: its data buffer is handed
    over as it is (``pa.Array.from_buffers`` one way, ``np.frombuffer`` the
    other), zero-copy as before. Anything else (another dtype, nulls, a
    strided array) goes through pyarrow as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa


def _numpy_dtype(kind: pa.DataType) -> np.dtype[Any] | None:
    """The NumPy dtype of a fixed-width numeric Arrow type, else None."""
    if pa.types.is_floating(kind):
        return np.dtype(f"f{kind.bit_width // 8}")
    if pa.types.is_signed_integer(kind):
        return np.dtype(f"i{kind.bit_width // 8}")
    if pa.types.is_unsigned_integer(kind):
        return np.dtype(f"u{kind.bit_width // 8}")
    return None


def arrow_array(values: Any, kind: pa.DataType | None = None) -> pa.Array:
    """``pa.array(values, type=kind)`` for a 1-D numeric array (NOTE: [Arrow without pandas]).

    Values are cast to ``kind``'s dtype when it is given (as ``pa.array``
    would); NaN stays NaN (not null), as with ``pa.array`` on an ndarray.
    """
    arr = np.asarray(values)
    if kind is None:
        if arr.dtype.kind not in "fiu":
            return pa.array(arr)
        kind = pa.from_numpy_dtype(arr.dtype)
    dtype = _numpy_dtype(kind)
    if dtype is None or arr.ndim != 1:
        return pa.array(arr, type=kind)
    arr = np.ascontiguousarray(arr, dtype=dtype)
    return pa.Array.from_buffers(kind, len(arr), [None, pa.py_buffer(arr)])


def numpy_view(array: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``array.to_numpy()`` for numeric arrays without nulls (NOTE: [Arrow without pandas]).

    A read-only view of Arrow's buffer for one chunk (as ``to_numpy`` gives),
    a new array for several.
    """
    if isinstance(array, pa.ChunkedArray):
        parts = [numpy_view(chunk) for chunk in array.chunks]
        if not parts:
            dtype = _numpy_dtype(array.type)
            return np.empty(0, dtype=dtype) if dtype is not None else array.to_numpy()
        return parts[0] if len(parts) == 1 else np.concatenate(parts)
    dtype = _numpy_dtype(array.type)
    if dtype is None or array.null_count:
        return array.to_numpy(zero_copy_only=False)
    data = array.buffers()[1]
    if data is None:  # an empty array may have no buffer
        return np.empty(0, dtype=dtype)
    return np.frombuffer(data, dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize)
