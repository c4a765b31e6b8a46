"""``pipeline.runner.job``: checks of a job before it runs."""

from __future__ import annotations

import pytest

from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions


def test_hessian_jobs_are_refused():
    from pipeline.runner.job import check_job

    with pytest.raises(JacpipeError, match="jacobian kind only"):
        check_job(RunOptions(job="rosenbrock", params=["n=4"], smooth="0.1"))
