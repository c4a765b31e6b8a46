"""``pipeline.analysis.compare``: a result against its reference, NaN/Inf, sampling, trust."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian
from typer.testing import CliRunner

from pipeline.analysis.compare import compare, disagreements, errors, explain_nan_differences
from pipeline.cli import app
from pipeline.core.options import RunOptions
from pipeline.maths.engine import jacobian_rows
from pipeline.runner import driver as runner
from tests.clitools import error_line
from tests.clitools import error_line as _one_error
from tests.faultruns import CRASHY, invoke
from tests.manifests import read_doc, write_doc
from tests.maths.kindrefs import run_job
from tests.maths.trust import DTYPES

cli = CliRunner()


def _run(*args: object):
    return cli.invoke(app, [str(a) for a in args])


def test_reading_never_runs_the_job_a_manifest_names(ray_session, tmp_path):
    out = tmp_path / "out"
    runner.run(RunOptions(job="tests.userjobs:matrix_io", shards=2, out=str(out),
                          progress=False), echo=lambda _: None)
    doc = read_doc(out)
    marker = tmp_path / "pwned"
    doc["job"], doc["params"] = "os:system", {"command": f"touch {marker}"}
    write_doc(out, doc)
    for cmd in (["compare", out], ["compare", out, "--fd"], ["inspect", out],
                ["compare", out, "--job", "tests.userjobs:matrix_io"]):
        _run(*cmd)
        assert not marker.exists(), cmd
    line = _one_error(_run("compare", out))
    assert "computed by job 'os:system'" in line and "--job os:system" in line
    doc["job"] = "../../etc/passwd:build"
    write_doc(out, doc)
    assert "dotted Python names" in _one_error(_run("compare", out, "--trust-job"))
    # The user's own module:function job: named now, it is rebuilt and compared.
    doc["job"], doc["params"] = "tests.userjobs:matrix_io", {}
    write_doc(out, doc)
    assert "MATCH" in _run("compare", out, "--job", "tests.userjobs:matrix_io").output
    assert "--job tests.userjobs:matrix_io" in _one_error(_run("compare", out))


def test_non_finite_entries_match_only_the_same_non_finite_reference():
    from pipeline.analysis.compare import errors

    ref = np.array([[1.0, np.nan, np.inf]])
    assert errors(ref.copy(), ref, rtol=1e-9, atol=0.0)[2] == 0.0
    for got in ([[np.nan, np.nan, np.inf]], [[1.0, 0.0, np.inf]], [[1.0, np.nan, -np.inf]]):
        assert errors(np.array(got), ref, rtol=1e-9, atol=0.0)[2] == np.inf


def test_compare_option_errors(clean):
    line = error_line(invoke("compare", clean.out, "--rows", 1, "--all", "--job", CRASHY))
    assert "give --rows K or --all, not both" in line
    line = error_line(invoke("compare", clean.out, "--rows", 0, "--job", CRASHY))
    assert "--rows must be at least 1" in line


def test_compare_samples_a_large_batch(ray_session, tmp_path, monkeypatch):
    import pipeline.analysis.compare as cmp

    out = run_job(tmp_path, "cnn", {"batch": 4, "channels": 2, "dtype": "float64"}, shards=2)
    monkeypatch.setattr(cmp, "MAX_FULL_SAMPLES", 3)  # 4 samples: too many for the loop
    report = compare(str(out), rtol=1e-10)
    assert report.ok and report.mode == "sampled" and report.rows_checked == 40


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_positions_that_differ_by_zero_times_nan_are_explained(dtype):
    x = torch.tensor([0.0, 1.0, 4.0], dtype=dtype)
    ref = jacobian(torch.sqrt, x).numpy()  # reverse mode: 0 / 0 = NaN off the diagonal
    got = jacobian_rows(torch.sqrt, x, 0, 3, method="fwd").numpy()  # forward mode: 0 there
    assert (np.isnan(ref) != np.isnan(got)).any()
    assert errors(got, ref, rtol=1e-5, atol=1e-5)[2] == np.inf  # a MISMATCH before
    fixed, note = explain_nan_differences(got, ref)
    assert "NaN on one side and 0 on the other" in note
    assert errors(fixed, ref, rtol=1e-5, atol=1e-5)[2] <= 1.0
    real = got.copy()
    real[0, 1] = np.nan  # NaN where the reference is finite and not 0: stays a mismatch
    real[1, 0] = 1.0
    same, note = explain_nan_differences(real, ref)
    assert note == "" and np.array_equal(np.isnan(same), np.isnan(real))


def test_disagreements_name_the_worst_entries():
    ref = np.zeros((3, 4))
    got = ref.copy()
    got[1, 2], got[2, 3] = 5.0, np.nan
    text = disagreements(got, ref, rows=np.array([10, 11, 12]), rtol=1e-5, atol=1e-5)
    assert text.startswith("2 entries") and "J[12, 3] = nan vs 0" in text
    assert "J[11, 2] = 5 vs 0" in text


def _table(result) -> dict[str, str]:
    """The metric -> value rows of a ``jacpipe compare`` table."""
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def test_a_smoothed_comparison_shows_no_plain_ad_tolerance_rows(tmp_path):
    """Plain rows used to contradict each other (max abs error 1.476, atol 5e-9, ratio 0.35)."""
    out = tmp_path / "s"
    done = _run("run", "contact", "--smooth", "0.01", "--samples", "64", "--shards", "2",
                "--out", out, "--executor", "local", "--no-progress")
    assert done.exit_code == 0, done.output
    result = cli.invoke(app, ["compare", str(out)], env={"COLUMNS": "240"})
    assert result.exit_code == 0, result.output
    rows = _table(result)
    assert "worst |diff| / combined stderr" in rows, rows
    assert "max |diff| vs reference" in rows, rows
    for plain in ("tolerance", "worst |err| / tol", "max abs error", "max rel error"):
        assert plain not in rows, rows


def test_compare_labels_which_rows_each_time_is_for(tmp_path):
    """``compare --rows 4`` printed reference seconds for 4 rows beside pipeline seconds for all."""
    out = tmp_path / "d"
    done = _run("run", "mlp", "-p", "n=8", "-p", "m=30", "-p", "hidden=4", "--shards", "2",
                "--out", out, "--executor", "local", "--no-progress")
    assert done.exit_code == 0, done.output
    rows = _table(cli.invoke(app, ["compare", str(out), "--rows", "4"], env={"COLUMNS": "240"}))
    assert "reference seconds (1 process, 4 rows)" in rows, rows
    assert "pipeline seconds (all 30 rows)" in rows, rows
    assert "tolerance" in rows and "worst |err| / tol" in rows


def test_the_reference_started_during_the_run_is_the_one_compare_uses(tmp_path):
    """NOTE: [The reference while Ray starts]: the same torch reference, computed early."""
    from pipeline.analysis.early import EarlyReference
    from pipeline.maths.kinds import reference_full
    from pipeline.runner.job import check_job

    out = tmp_path / "d"
    params = ["n=8", "m=30", "hidden=4", "dtype=float64"]
    done = _run("run", "mlp", *sum((["-p", p] for p in params), []), "--shards", "2",
                "--out", out, "--executor", "local", "--no-progress")
    assert done.exit_code == 0, done.output
    checked = check_job(RunOptions(job="mlp", params=params), keep_built=True)
    early = EarlyReference()
    early.start(checked)
    problem, reference = early.result()
    assert problem is checked.built
    np.testing.assert_array_equal(reference[0], reference_full(problem))
    report = compare(str(out), problem=problem, reference=reference)
    assert report.ok and report.mode == "all" and report.reference_seconds == round(
        reference[1], 4)
    # it is the reference compared against: a wrong one is a mismatch
    wrong = compare(str(out), problem=problem, reference=(reference[0] * 1.5, reference[1]))
    assert not wrong.ok and wrong.worst_ratio > 1
    # a reference too big to hold through the run is not started; compare computes its own
    small = EarlyReference(hold=0)
    small.start(checked)
    assert small.result() == (None, None)
    without = check_job(RunOptions(job="mlp", params=params))
    assert without.built is None


def _errors_whole(got, ref, *, rtol, atol):
    """The whole-array version ``errors`` had before it went block by block."""
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    both_nan = np.isnan(got) & np.isnan(ref)
    same_inf = np.isinf(got) & (got == ref)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        diff = np.where(both_nan | same_inf, 0.0, np.abs(got - ref))
        diff = np.where(np.isnan(diff), np.inf, diff)
        finite_ref = np.abs(np.where(np.isfinite(ref), ref, 0.0))
        scale = float(finite_ref.max())
        max_abs = float(diff.max())
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        tol = atol + rtol * finite_ref
        worst = float(np.where(diff == 0, 0.0, diff / tol).max())
    return max_abs, max_rel, worst


@pytest.mark.parametrize("case", ["close", "nan", "inf", "zeros", "far"])
def test_errors_block_by_block_equal_the_whole_array_ones(case):
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((300, 700)).astype(np.float32)  # 3+ blocks of 64k entries
    got = ref + np.float32(1e-6) * rng.standard_normal(ref.shape).astype(np.float32)
    if case == "nan":
        got[5, 5] = ref[5, 5] = np.nan
        got[250, 3] = np.nan  # one-sided: an infinite difference
    if case == "inf":
        got[7, 1] = ref[7, 1] = np.inf
        got[290, 600], ref[290, 600] = np.inf, -np.inf
    if case == "zeros":
        ref[:] = 0
        got[:] = 0
        got[299, 699] = 1e-30
    if case == "far":
        got[123, 456] += 10
    for rtol, atol in ((1e-5, 1e-7), (0.0, 0.0)):
        assert errors(got, ref, rtol=rtol, atol=atol) == _errors_whole(got, ref, rtol=rtol,
                                                                       atol=atol)
