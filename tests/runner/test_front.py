"""The front door (pipeline.jacobian, hessian, batched_jacobian) against torch.func."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import pipeline
from pipeline.core.errors import JacpipeError
from pipeline.runner import front
from pipeline.store.reader import JacobianResult
from tests.maths.trust import WRONG_VMAP_FACTOR, DoubledUnderVmap

# The suite's default executor is ray (tests/conftest.py); these calls pick theirs.
LOCAL = {"executor": "local"}


def _mlp(dtype: torch.dtype = torch.float64, n: int = 9, m: int = 12):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(m, n, generator=g, dtype=dtype)
    b = torch.randn(m, generator=g, dtype=dtype)
    return (lambda t: torch.tanh(w @ t + b) * t.sum()), torch.randn(n, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["auto", "rev", "fwd"])
def test_jacobian_equals_jacrev(dtype, method):
    fn, x = _mlp(dtype)
    got = pipeline.jacobian(fn, x, method=method, **LOCAL)
    assert isinstance(got, torch.Tensor) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, torch.func.jacrev(fn)(x), rtol=tol, atol=tol)


def test_jacobian_keeps_the_shapes_of_jacrev_and_needs_no_requires_grad():
    w = torch.randn(2, 5, 3, 4, dtype=torch.float64)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.sin(torch.einsum("abij,ij->ab", w, t))

    x = torch.randn(3, 4, dtype=torch.float64)
    got = pipeline.jacobian(fn, x, chunk_size=3, **LOCAL)
    assert got.shape == (2, 5, 3, 4) and not got.requires_grad
    torch.testing.assert_close(got, torch.autograd.functional.jacobian(fn, x))


def test_hessian_equals_torch_hessian():
    def energy(t: torch.Tensor) -> torch.Tensor:
        return (torch.sin(t) ** 2).sum() * t.norm()

    x = torch.linspace(-1, 1, 7, dtype=torch.float64)
    got = pipeline.hessian(energy, x, **LOCAL)
    torch.testing.assert_close(got, torch.func.hessian(energy)(x))


def test_batched_jacobian_equals_vmap_jacrev():
    fn, _ = _mlp()
    xs = torch.randn(4, 9, dtype=torch.float64)
    got = pipeline.batched_jacobian(fn, xs, **LOCAL)
    assert got.shape == (4, 12, 9)
    torch.testing.assert_close(got, torch.func.vmap(torch.func.jacrev(fn))(xs))


def test_a_sparse_pattern_gives_a_scipy_matrix():
    n = 30
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    pattern = sp.diags([1, 1, 1], [-1, 0, 1], shape=(n, n), format="csr")
    got = pipeline.jacobian(_stencil, x, sparsity=pattern, **LOCAL)
    assert sp.issparse(got)
    np.testing.assert_allclose(got.toarray(), torch.func.jacrev(_stencil)(x).numpy(),
                               rtol=1e-12, atol=1e-12)


def _stencil(t: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(t, (1, 1))
    return padded[:-2] - 2 * padded[1:-1] + padded[2:] + t**3


def test_a_pattern_detected_on_its_own_still_gives_a_tensor(monkeypatch):
    # NOTE: [The type of the result is the caller's]: whether method="auto" detects
    # (a timed pass decides; forced here) changes how the rows are computed, not what
    # comes back: the tensor jacrev gives, unless a sparse result is asked for.
    from pipeline.runner import job

    monkeypatch.setattr(job, "DETECT_MIN_SECONDS", 0.0)
    used: list[int] = []
    real = front._sparse_in_memory
    monkeypatch.setattr(front, "_sparse_in_memory",
                        lambda *a: used.append(1) or real(*a))
    x = torch.linspace(0, 1, 60, dtype=torch.float64)
    want = torch.func.jacrev(_stencil)(x)
    got = pipeline.jacobian(_stencil, x, **LOCAL)
    assert used == [1]  # the colours were evaluated ...
    assert isinstance(got, torch.Tensor) and got.shape == (60, 60) and got.dtype == x.dtype
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # ... and made dense
    for asked in ({"sparsity": "auto"}, {"method": "sparse", "sparsity": "auto"}):
        got = pipeline.jacobian(_stencil, x, **asked, **LOCAL)
        assert sp.issparse(got), asked
        np.testing.assert_allclose(got.toarray(), want.numpy(), rtol=1e-12, atol=1e-12)

    def energy(t: torch.Tensor) -> torch.Tensor:
        return (t * _stencil(t)).sum()

    used.clear()
    got = pipeline.hessian(energy, x, **LOCAL)
    assert used == [1] and isinstance(got, torch.Tensor)
    torch.testing.assert_close(got, torch.func.hessian(energy)(x), rtol=1e-10, atol=1e-10)


def test_a_detected_sparse_result_too_big_to_hold_dense_comes_back_opened(tmp_path,
                                                                          monkeypatch):
    # Its CSR would fit, the tensor the caller gets would not: the folder, opened.
    from pipeline.runner import job

    monkeypatch.setattr(job, "DETECT_MIN_SECONDS", 0.0)
    monkeypatch.setattr(front, "_dense_bytes", lambda job: 2**50)
    monkeypatch.setattr(front.tempfile, "mkdtemp", lambda prefix="": str(tmp_path / "kept"))
    x = torch.linspace(0, 1, 60, dtype=torch.float64)
    lines: list[str] = []
    got = pipeline.jacobian(_stencil, x, echo=lines.append, **LOCAL)
    assert isinstance(got, JacobianResult) and (tmp_path / "kept").is_dir()
    assert got.layout == "sparse"  # the colours ran: a sparse folder
    np.testing.assert_allclose(got.read(as_="scipy").toarray(),
                               torch.func.jacrev(_stencil)(x).numpy(), rtol=1e-12)
    assert any("exceeds half the memory budget" in line for line in lines)


def test_out_returns_the_folder_opened_and_a_rerun_returns_it_without_computing(tmp_path):
    fn, x = _mlp()
    out = str(tmp_path / "J")
    first = pipeline.jacobian(fn, x, out=out, shards=3, **LOCAL)
    assert isinstance(first, JacobianResult)
    ref = torch.func.jacrev(fn)(x).numpy()
    np.testing.assert_allclose(first.read(), ref, rtol=1e-12, atol=1e-12)
    again = pipeline.jacobian(fn, x, out=out, shards=3, **LOCAL)
    # The same shards, computed by the first call's run: nothing was recomputed.
    assert [s.run_id for s in again.committed] == [s.run_id for s in first.committed]


def test_errors_name_python_arguments_not_flags(tmp_path):
    fn, x = _mlp()
    out = str(tmp_path / "J")
    pipeline.jacobian(fn, x, out=out, **LOCAL)
    with pytest.raises(JacpipeError) as caught:
        pipeline.jacobian(fn, x + 1, out=out, **LOCAL)  # another point: another result
    line = str(caught.value)
    assert "overwrite=True" in line and "--overwrite" not in line, line
    moved = pipeline.jacobian(fn, x + 1, out=out, overwrite=True, **LOCAL)
    np.testing.assert_allclose(moved.read(), torch.func.jacrev(fn)(x + 1).numpy(), rtol=1e-12)
    with pytest.raises(JacpipeError, match="pipeline.jacobian: unknown option\\(s\\) shardz"):
        pipeline.jacobian(fn, x, shardz=2)
    with pytest.raises(JacpipeError, match="^chunk_size must be at least 1, got 0$"):
        pipeline.jacobian(fn, x, chunk_size=0)


def test_the_folder_path_reads_back_and_removes_its_temporary_folder(tmp_path, monkeypatch):
    """A result not kept in memory goes through a temporary folder, read back and removed."""
    made = []

    def mkdtemp(prefix: str = "") -> str:
        made.append(tmp_path / f"{prefix}tmp")
        made[-1].mkdir()
        return str(made[-1])

    monkeypatch.setattr(front, "_fits", lambda job, plan: False)
    monkeypatch.setattr(front.tempfile, "mkdtemp", mkdtemp)
    fn, x = _mlp()
    got = pipeline.jacobian(fn, x, shards=2, **LOCAL)
    torch.testing.assert_close(got, torch.func.jacrev(fn)(x))
    assert len(made) == 1 and not made[0].exists()


def test_a_result_beyond_the_memory_budget_comes_back_opened(tmp_path, monkeypatch):
    monkeypatch.setattr(front, "_fits", lambda job, plan: False)
    monkeypatch.setattr(front, "_stored_bytes", lambda result: 2**50)
    monkeypatch.setattr(front.tempfile, "mkdtemp", lambda prefix="": str(tmp_path / "kept"))
    fn, x = _mlp()
    lines: list[str] = []
    got = pipeline.jacobian(fn, x, echo=lines.append, **LOCAL)
    assert isinstance(got, JacobianResult) and (tmp_path / "kept").is_dir()
    np.testing.assert_allclose(got.read(), torch.func.jacrev(fn)(x).numpy(), rtol=1e-12)
    assert any("exceeds half the memory budget" in line for line in lines)


def test_pipeline_run_errors_name_python_arguments(tmp_path):
    fn, x = _mlp()
    out = str(tmp_path / "o")
    summary = pipeline.run(pipeline.Problem(fn=fn, x=x), out=out, progress=False, **LOCAL)
    shown = repr(summary)  # one line, not the manifest
    assert "\n" not in shown and len(shown) < 400 and "computed=" in shown, shown
    with pytest.raises(JacpipeError) as caught:
        pipeline.run(pipeline.Problem(fn=fn, x=2 * x), out=out, progress=False, **LOCAL)
    assert "overwrite=True" in str(caught.value) and "--" not in str(caught.value)


_LOOP = """
import json, torch, ray, pipeline
w = torch.randn(40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) / 7
fn = lambda t: torch.tanh(w @ t) + t
x = torch.zeros(40, dtype=torch.float64)
pids, up, errs, lines = [], [], [], []
for k in range(3):
    s = pipeline.run(pipeline.Problem(fn=fn, x=x), out=f"o{k}", shards=2, executor="ray",
                     progress=False, num_cpus=2, echo=lines.append)
    pids.append(sorted({e.pid for e in s.manifest.committed}))
    up.append(ray.is_initialized())
    if k == 0:  # NOTE: [A lean embedded Ray]: what this Ray started, and Ray's Node restored
        from ray._private.node import Node
        started = sorted(ray._private.worker._global_node.all_processes)
        restored = Node.start_monitor.__name__ == "start_monitor"
    J = pipeline.jacobian(fn, x, executor="ray", echo=lines.append)
    errs.append(float((J - torch.func.jacrev(fn)(x)).abs().max()))
    x = x - torch.linalg.solve(J, fn(x) - 1)
pipeline.shutdown()
starts = sum(line.startswith("Ray started") for line in lines)
print(json.dumps({"pids": pids, "up": up, "errs": errs, "after": ray.is_initialized(),
                  "starts": starts, "started": started, "restored": restored}))
"""


@pytest.mark.slow
def test_one_embedded_ray_serves_a_newton_loop_and_stops_on_shutdown(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JACPIPE_EXECUTOR"}
    env["PYTHONPATH"] = os.getcwd()
    done = subprocess.run([sys.executable, "-c", _LOOP], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["up"] == [True, True, True] and doc["after"] is False
    # One Ray start for six calls, and the shards of all three runs ran in the two
    # or three worker processes of that Ray (a Ray per run starts new ones each time).
    assert doc["starts"] == 1
    assert len(set().union(*map(set, doc["pids"]))) <= 3
    assert max(doc["errs"]) < 1e-12
    # an embedded Ray starts neither an autoscaler monitor nor a dashboard process
    assert "raylet" in doc["started"] and "gcs_server" in doc["started"], doc["started"]
    assert not {"monitor", "dashboard"} & set(doc["started"]), doc["started"]
    assert doc["restored"] is True


def test_on_the_callers_ray_rows_come_back_in_memory_and_failures_are_one_line(ray_session):
    fn, x = _mlp()
    got = pipeline.jacobian(fn, x, shards=3, executor="ray")
    torch.testing.assert_close(got, torch.func.jacrev(fn)(x))
    driver = os.getpid()

    def fails_on_workers(t: torch.Tensor) -> torch.Tensor:
        if os.getpid() != driver:
            raise ValueError("boom on a worker")
        return fn(t)

    # whichever shard's failure arrives first names itself
    with pytest.raises(JacpipeError, match="^shard [01] \\(rows [0-9]+..[0-9]+\\): .*ValueError: "
                       "boom on a worker$"):
        pipeline.jacobian(fails_on_workers, x, shards=2, executor="ray")
    assert ray_session.is_initialized()  # the caller's Ray is theirs: still up


def test_notes_go_to_the_pipeline_logger_not_stdout(tmp_path, capsys, caplog):
    import logging

    fn, x = _mlp()
    for _ in range(2):  # the second call resumes, and says so
        with caplog.at_level(logging.INFO, logger="pipeline"):
            pipeline.run(pipeline.Problem(fn=fn, x=x), out=str(tmp_path / "o"), progress=False,
                         shards=2, **LOCAL)
    assert capsys.readouterr().out == ""
    notes = [r for r in caplog.records if r.name == "pipeline"]
    assert any(r.getMessage() == "resuming: 2 of 2 shards already committed"
               and r.levelno == logging.INFO for r in notes), [r.getMessage() for r in notes]
    from pipeline.runner.driver import log_line

    with caplog.at_level(logging.INFO, logger="pipeline"):
        log_line("warning: the disk is small")
    assert caplog.records[-1].levelno == logging.WARNING
    assert caplog.records[-1].getMessage() == "the disk is small"


def test_a_small_closure_with_a_wrong_batching_rule_is_right_without_the_run_level_spot_check():
    """A few ms of work skips the run's vmap spot check; the engine's own check still holds.

    ``torch.cdist``'s batched backward is wrong (``torch.func.jacrev`` is off);
    the one engine call of a small in-process result checks a random row of
    its own against an unbatched pullback and computes its rows one at a time.
    """
    from torch.autograd.functional import jacobian

    from pipeline.core.options import RunOptions
    from pipeline.maths.checks import VmapMismatchWarning
    from pipeline.runner.job import check_job

    y0 = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.cdist(t.reshape(-1, 3), y0).reshape(-1)

    x = torch.linspace(-0.7, 0.9, 15, dtype=torch.float64)
    ref = jacobian(fn, x)
    assert (torch.func.jacrev(fn)(x) - ref).abs().max() > 0.1  # torch's bug
    job = check_job(RunOptions(job="python:fn"), pipeline.Problem(fn=fn, x=x), in_process=True)
    assert job.spot is None  # a few ms of work: no run-level spot check
    with pytest.warns(VmapMismatchWarning, match="without vmap"):
        got = pipeline.jacobian(fn, x, **LOCAL)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


class _SinWrongUnderVmap(torch.autograd.Function):
    """sin, whose backward is right alone and doubled under vmap (as torch.cdist's)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(v):
        return torch.sin(v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        return DoubledUnderVmap.apply(g) * torch.cos(v)


def _wrong_under_vmap_fn():
    w = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    return lambda t: _SinWrongUnderVmap.apply(w @ t)


def test_a_wrong_batching_rule_is_refused_on_the_first_call_and_every_later_one():
    """NOTE: [Repeated calls of one function]: found on the first call, the function is
    never remembered, so every later call checks its rows too."""
    from torch.autograd.functional import jacobian

    from pipeline.maths.checks import VmapMismatchWarning

    fn = _wrong_under_vmap_fn()
    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(torch.func.jacrev(fn)(x), 2 * jacobian(fn, x))  # the bug
    for k in range(front.SPOT_EVERY + 2):
        with pytest.warns(VmapMismatchWarning, match="without vmap"):
            got = pipeline.jacobian(fn, x + k, **LOCAL)
        torch.testing.assert_close(got, jacobian(fn, x + k), rtol=1e-12, atol=1e-12)
    assert not front._REMEMBERED.get(fn)


@pytest.mark.parametrize("every", [1, 8])
def test_a_rule_gone_wrong_after_the_first_call_is_caught_on_the_next_checked_call(
        monkeypatch, every):
    """What the NOTE says a remembered call skips: by default every call is checked;
    spaced (JACPIPE_CHECK_EVERY_CALL=0), every SPOT_EVERY-th."""
    monkeypatch.setattr(front, "SPOT_EVERY", 8)
    if every > 1:
        monkeypatch.setenv("JACPIPE_CHECK_EVERY_CALL", "0")
    fn = _wrong_under_vmap_fn()
    WRONG_VMAP_FACTOR[0] = 1.0  # right at first: remembered
    try:
        _rule_gone_wrong(fn, every)
    finally:
        WRONG_VMAP_FACTOR[0] = 2.0


def _rule_gone_wrong(fn, every: int) -> None:
    import warnings

    from torch.autograd.functional import jacobian

    from pipeline.maths.checks import VmapMismatchWarning

    x = torch.linspace(-1, 1, 5, dtype=torch.float64)
    torch.testing.assert_close(pipeline.jacobian(fn, x, **LOCAL), jacobian(fn, x))
    assert fn in front._REMEMBERED
    WRONG_VMAP_FACTOR[0] = 2.0  # the rule goes wrong (as a rule wrong at other points only would)
    wrong = 0
    for k in range(1, 2 * 8 + 1):  # remembered calls 1, 2, ...
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = pipeline.jacobian(fn, x + k, **LOCAL)
        ok = torch.allclose(got, jacobian(fn, x + k), rtol=1e-12, atol=1e-12)
        flagged = any(issubclass(c.category, VmapMismatchWarning) for c in caught)
        assert ok or not flagged  # a checked call is right
        wrong += not ok
        if flagged:
            assert k == every  # the first checked remembered call
            break
    assert flagged and wrong == every - 1 and not front._REMEMBERED.get(fn)
    for k in range(3):  # forgotten: every call is checked again
        with pytest.warns(VmapMismatchWarning, match="without vmap"):
            got = pipeline.jacobian(fn, x - k, **LOCAL)
        torch.testing.assert_close(got, jacobian(fn, x - k), rtol=1e-12, atol=1e-12)


def test_a_repeated_call_reuses_its_plan_and_plans_again_when_fn_changes(monkeypatch):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 5, generator=g, dtype=torch.float64)
    rows, dtype = [8], [torch.float64]

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w[:rows[0]] @ t).to(dtype[0])

    x = torch.randn(5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(pipeline.jacobian(fn, x, **LOCAL), torch.func.jacrev(fn)(x))
    planned = []
    check_job = front.check_job
    monkeypatch.setattr(front, "check_job", lambda *a, **k: planned.append(1) or check_job(*a, **k))
    for y in (2 * x, x.sin()):  # new points, the remembered plan
        torch.testing.assert_close(pipeline.jacobian(fn, y, **LOCAL), torch.func.jacrev(fn)(y))
    assert planned == []
    rows[0] = 3  # fn's output changes shape: planned (and checked) again
    got = pipeline.jacobian(fn, x, **LOCAL)
    assert got.shape == (3, 5) and planned == [1]
    torch.testing.assert_close(got, torch.func.jacrev(fn)(x))
    pipeline.jacobian(fn, x, method="rev", **LOCAL)  # other options: another key
    assert planned == [1, 1]
    dtype[0] = torch.float32  # refused as a first call is
    with pytest.raises(JacpipeError, match="returned torch.float32 for an input of"):
        pipeline.jacobian(fn, x, **LOCAL)


def test_the_in_memory_path_takes_the_callers_chunk_size_and_one_pass_otherwise(monkeypatch):
    from pipeline.maths import kinds

    seen = []
    iter_rows = kinds.iter_rows
    monkeypatch.setattr(kinds, "iter_rows",
                        lambda *a, **k: seen.append(k["chunk_size"]) or iter_rows(*a, **k))
    fn, x = _mlp(n=100, m=100)
    for chunk_size in (None, 7, None):
        got = pipeline.jacobian(fn, x, chunk_size=chunk_size, **LOCAL)
        torch.testing.assert_close(got, torch.func.jacrev(fn)(x))
    assert seen[1] == 7 and seen[0] >= 100 and seen[2] == seen[0]


def test_repeated_hessian_and_batched_calls_are_remembered_and_right():
    g = torch.Generator().manual_seed(11)
    w = torch.randn(6, 4, generator=g, dtype=torch.float64)

    def energy(t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w @ t).pow(2).sum()

    def sample(t: torch.Tensor) -> torch.Tensor:
        return torch.sin(w @ t)

    for _ in range(3):
        x = torch.randn(4, generator=g, dtype=torch.float64)
        xs = torch.randn(5, 4, generator=g, dtype=torch.float64)
        torch.testing.assert_close(pipeline.hessian(energy, x, **LOCAL),
                                   torch.func.hessian(energy)(x))
        torch.testing.assert_close(pipeline.batched_jacobian(sample, xs, **LOCAL),
                                   torch.func.vmap(torch.func.jacrev(sample))(xs))
    assert front._REMEMBERED.get(energy) and front._REMEMBERED.get(sample)


def test_a_remembered_call_whose_output_grows_or_changes_shape_is_planned_again():
    """The output's shape comes from the reverse pass that computes the rows (no extra
    ``fn(x)``): a larger output, or the same size in another shape, is planned afresh."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(12, 5, generator=g, dtype=torch.float64)
    rows, shape = [3], [(-1,)]

    def fn(t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(w[:rows[0]] @ t).reshape(shape[0])

    x = torch.randn(5, generator=g, dtype=torch.float64)
    for _ in range(2):  # remembered at 3 outputs
        torch.testing.assert_close(pipeline.jacobian(fn, x, **LOCAL), torch.func.jacrev(fn)(x))
    assert front._REMEMBERED.get(fn)
    rows[0] = 12  # more outputs than the remembered plan's rows
    got = pipeline.jacobian(fn, x, **LOCAL)
    assert got.shape == (12, 5)
    torch.testing.assert_close(got, torch.func.jacrev(fn)(x))
    pipeline.jacobian(fn, x, **LOCAL)
    shape[0] = (3, 4)  # the same 12 outputs, another shape
    got = pipeline.jacobian(fn, x, **LOCAL)
    assert got.shape == (3, 4, 5)
    torch.testing.assert_close(got, torch.func.jacrev(fn)(x))
