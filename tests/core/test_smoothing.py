"""``pipeline.core.smoothing``: --smooth settings, parsed and checked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions
from pipeline.core.smoothing import Smoothing, parse_smooth


def test_sigma_auto_and_per_input_file(tmp_path):
    x = torch.tensor([0.5, -300.0, 2.0], dtype=torch.float64)
    auto = parse_smooth("auto")
    np.testing.assert_allclose(auto.sigma_vector(x), [0.01, 3.0, 0.02])
    path = tmp_path / "sigma.npy"
    np.save(path, np.array([0.1, 0.2, 0.3]))
    vec = parse_smooth(str(path))
    np.testing.assert_allclose(vec.sigma_vector(x), [0.1, 0.2, 0.3])
    assert Smoothing.from_json(vec.to_json()) == vec
    with pytest.raises(JacpipeError, match="3 sigmas for 2 inputs"):
        vec.sigma_vector(x[:2])


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"smooth": "-1"}, "positive"),
    ({"smooth": "wide"}, "positive number, auto, or a .npy"),
    ({"smooth": "0.1", "samples": 7}, "even number >= 4"),
    ({"smooth": "0.1", "samples": 2}, "even number >= 4"),
    ({"smooth": "0.1", "estimator": "second"}, "first, zeroth or both"),
    ({"smooth": "missing.npy"}, "cannot read"),
    ({"smooth": "0.1", "method": "sparse"}, "dense rows"),
])
def test_bad_smoothing_options_are_one_line(kwargs, message):
    with pytest.raises(JacpipeError, match=message):
        RunOptions(job="contact", **kwargs).check()
