"""``pipeline.runner.ntk``: an eNTK written as rows of a result folder, read back as any."""

from __future__ import annotations

import numpy as np
import pytest

import pipeline
from pipeline import JacpipeError
from pipeline.analysis.svd import operator_svd
from tests.maths.ntkrefs import images, small_cnn, tutorial_full, tutorial_ntk


def test_rows_of_k_read_back_as_a_matrix_an_operator_and_singular_values(tmp_path):
    net, x1, x2 = small_cnn(), images(5), images(3, seed=2)
    out = tmp_path / "k"
    manifest = pipeline.write_ntk(net, x1, x2, out=str(out), samples_per_shard=2)
    ref = tutorial_full(net, x1, x2).numpy()
    got = pipeline.read_jacobian(out)
    assert got.shape == ref.shape == (15, 9) and len(manifest.plan) == 3
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * np.abs(ref).max())
    facts = manifest.fingerprint["ntk"]
    assert facts["kernel"] == "full" and facts["method"] in ("contraction", "structured")
    v = np.random.default_rng(0).standard_normal(9)
    op = pipeline.open_jacobian(out).as_linear_operator()
    np.testing.assert_allclose(op @ v, ref @ v, rtol=1e-10, atol=1e-10)
    svd = operator_svd(pipeline.open_jacobian(out).as_linear_operator(dtype="float64"), 3)
    np.testing.assert_allclose(svd.s, np.linalg.svd(ref, compute_uv=False)[:3], rtol=1e-8)


def test_a_symmetric_trace_kernel_and_an_occupied_folder(tmp_path):
    net, x = small_cnn(), images(4)
    out = str(tmp_path / "t")
    pipeline.write_ntk(net, x, out=out, kernel="trace", samples_per_shard=3)
    ref = tutorial_ntk(net, x, x, "trace").numpy()
    np.testing.assert_allclose(pipeline.read_jacobian(out), ref, rtol=1e-10,
                               atol=1e-10 * np.abs(ref).max())
    with pytest.raises(JacpipeError):
        pipeline.write_ntk(net, x, out=out, kernel="sum")
    pipeline.write_ntk(net, x, out=out, kernel="sum", overwrite=True)
    assert pipeline.read_jacobian(out).shape == (4, 4)
