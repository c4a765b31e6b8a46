"""``pipeline.store.arrays``: NumPy <-> Arrow without pandas, equal to pyarrow's own."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from pipeline.store.arrays import arrow_array, numpy_view


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "int32", "int64", "uint8"])
def test_arrays_equal_pyarrows_both_ways(dtype):
    values = (np.arange(-5, 20) * 3).astype(dtype)
    values[3] = np.nan if values.dtype.kind == "f" else values[3]
    got = arrow_array(values)
    ref = pa.array(values)
    assert got.type == ref.type == pa.from_numpy_dtype(np.dtype(dtype))
    assert got.null_count == ref.null_count == 0  # NaN stays NaN, not null
    np.testing.assert_array_equal(got.to_numpy(zero_copy_only=False), ref.to_numpy())
    np.testing.assert_array_equal(numpy_view(got), got.to_numpy(zero_copy_only=False))
    sliced = got.slice(4, 9)  # an offset into the buffer
    np.testing.assert_array_equal(numpy_view(sliced), values[4:13])
    chunked = pa.chunked_array([got.slice(0, 7), got.slice(7)])
    np.testing.assert_array_equal(numpy_view(chunked), values)


def test_a_cast_a_strided_input_and_the_fallbacks():
    as_float32 = arrow_array(np.linspace(0, 1, 9), pa.float32())  # cast, as pa.array does
    assert as_float32.equals(pa.array(np.linspace(0, 1, 9), type=pa.float32()))
    strided = np.arange(20, dtype=np.float64)[::3]
    assert arrow_array(strided).equals(pa.array(strided))
    with_nulls = pa.array([1.0, None, 3.0])
    np.testing.assert_array_equal(numpy_view(with_nulls), [1.0, np.nan, 3.0])
    assert numpy_view(pa.array([], type=pa.float64())).shape == (0,)
    assert numpy_view(pa.chunked_array([], type=pa.int64())).dtype == np.int64
    fixed = pa.FixedSizeListArray.from_arrays(arrow_array(np.arange(6.0)), 3)
    np.testing.assert_array_equal(numpy_view(fixed.slice(1).flatten()), [3.0, 4.0, 5.0])


def test_writing_and_reading_a_result_imports_no_pandas(tmp_path):
    """NOTE: [Arrow without pandas], in a fresh interpreter: a local run, then a read."""
    code = ("import sys\nfrom pipeline.runner.driver import run\n"
            "from pipeline.store.reader import read_jacobian\n"
            "run('mlp', params={'n': 30, 'm': 20}, shards=2, executor='local', out='o', "
            "progress=False)\nJ = read_jacobian('o')\n"
            "print(tuple(J.shape), *(m in sys.modules for m in ('pandas', 'ray', 'sympy')))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr[-2000:]
    # nor Ray (not in a Ray task: NOTE in worker._ray_gpus), nor sympy (NOTE: [backward
    # without sympy]): an in-process run pays for none of them
    assert done.stdout.split()[-5:] == ["(20,", "30)", "False", "False", "False"], done.stdout
