"""Every command through Typer's CliRunner, every user error, and one real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from torch.autograd.functional import jacobian
from typer.testing import CliRunner

from pipeline import read_jacobian
from pipeline.cli import app
from pipeline.problem.problem import build_problem
from tests.manifests import read_doc

runner = CliRunner()
SMALL = ["-p", "n=60", "-p", "m=50", "-p", "hidden=16"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, match, code=None):
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert match in errors[0], errors[0]


def test_help_imports_neither_torch_nor_ray():
    code = ("import sys; from pipeline.cli import main; sys.argv=['jacpipe','--help']\n"
            "try:\n main()\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch','ray','pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Usage" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_jobs_lists_builtin_jobs_with_parameters():
    result = invoke("jobs", "--json")
    assert result.exit_code == 0
    listing = {item["job"]: item for item in json.loads(result.output)}
    assert {"mlp", "robot_arm", "heat"} <= set(listing)
    assert listing["mlp"]["params"]["n"] == 2000
    assert listing["heat"]["doc"]
    table = invoke("jobs")
    assert "robot_arm" in table.output and "hidden=512" in table.output


def test_run_inspect_compare_round_trip(ray_session, tmp_path):
    out = tmp_path / "mlp"
    result = invoke("run", "mlp", *SMALL, "-p", "dtype=float64", "--shards", 3, "--out", out,
                    "--verify")
    assert result.exit_code == 0, result.output
    assert "MATCH" in result.output and "MISMATCH" not in result.output
    problem = build_problem("mlp", {"n": 60, "m": 50, "hidden": 16, "dtype": "float64"})
    ref = jacobian(problem.fn, problem.x).numpy()
    np.testing.assert_allclose(read_jacobian(out), ref, rtol=1e-12, atol=1e-14)

    info = json.loads(invoke("inspect", out, "--json").output)
    assert info["shape"] == [50, 60] and info["shards_committed"] == 3
    assert info["frobenius_norm"] == pytest.approx(np.linalg.norm(ref), rel=1e-10)
    assert info["nan"] == 0 and info["problems"] == []
    assert "Frobenius" in invoke("inspect", out).output

    cmp = json.loads(invoke("compare", out, "--json").output)
    assert cmp["ok"] and cmp["mode"] == "all" and cmp["rows_checked"] == 50
    sampled = json.loads(invoke("compare", out, "--rows", 5, "--json").output)
    assert sampled["mode"] == "sampled" and sampled["rows_checked"] == 5


def test_compare_fails_on_a_wrong_result(ray_session, tmp_path):
    out = tmp_path / "r"
    assert invoke("run", "mlp", *SMALL, "--shards", 2, "--out", out).exit_code == 0
    # Tamper with the values but keep the manifest's checksums consistent:
    # compare must catch it from the numbers alone.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.store.manifest import Manifest
    from pipeline.store.storage import Storage

    f = out / "part-00001.parquet"
    table = pq.read_table(f)
    vals = np.stack(table.column("values").to_numpy(zero_copy_only=False)) * 1.001
    arr = pa.FixedSizeListArray.from_arrays(pa.array(vals.reshape(-1).astype(np.float32)),
                                            type=table.schema.field("values").type)
    pq.write_table(table.set_column(1, table.schema.field("values"), arr), f)
    man = read_doc(out)
    storage = Storage(str(out))
    man["shards"][1]["checksum"] = storage.sha256("part-00001.parquet")
    man["shards"][1]["bytes"] = storage.size("part-00001.parquet")
    Manifest.from_json(man).write(storage)
    result = invoke("compare", out)
    assert result.exit_code == 1 and "MISMATCH" in result.output


@pytest.mark.parametrize("args,match", [
    (["run", "nope"], "unknown job 'nope'"),
    (["run", "mlp", "-p", "size=3"], "unknown parameter 'size'"),
    (["run", "mlp", "-p", "n=three"], "expected int"),
    (["run", "mlp", "-p", "n"], "NAME=VALUE"),
    (["run", "tests.userjobs:returns_list"], "must return a torch.Tensor"),
    (["run", "tests.userjobs:returns_int"], "floating output"),
    (["run", "tests.userjobs:integer_input"], "floating input"),
    (["run", "mlp", "--shards", "0"], "--shards must be at least 1"),
    (["run", "mlp", "--dtype", "float16"], "--dtype must be float32 or float64"),
    (["run", "mlp", "--method", "sideways"], "auto, rev or fwd"),
    (["run", "mlp", "--memory-budget", "lots"], "memory size 'lots'"),
    (["run", "mlp", "--address", "127.0.0.1:1"], "no Ray cluster reachable"),
])
def test_user_errors_are_one_line_and_non_zero(args, match, tmp_path):
    result = invoke(*args, "--out", tmp_path / "o")
    assert_one_line_error(result, match)


def test_device_cuda_without_gpus_is_refused_before_scheduling(ray_session, tmp_path):
    result = invoke("run", "mlp", *SMALL, "--device", "cuda", "--out", tmp_path / "o")
    assert_one_line_error(result, "no GPUs")
    assert not (tmp_path / "o" / "_manifest.parquet").exists()


def test_more_shards_than_rows_is_clamped_with_a_note(ray_session, tmp_path):
    result = invoke("run", "robot_arm", "--shards", 50, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "using 12 shards" in result.output
    man = read_doc(tmp_path / "o")
    assert len(man["plan"]) == 12 and len(man["shards"]) == 12


def test_out_folder_of_another_job_is_refused_unless_overwrite(ray_session, tmp_path):
    out = tmp_path / "o"
    assert invoke("run", "robot_arm", "--out", out).exit_code == 0
    result = invoke("run", "mlp", *SMALL, "--out", out)
    assert_one_line_error(result, "holds a result of job 'robot_arm'")
    assert invoke("run", "mlp", *SMALL, "--out", out, "--overwrite").exit_code == 0
    assert read_doc(out)["job"] == "mlp"


def test_out_folder_with_foreign_files_is_refused(tmp_path, ray_session):
    (tmp_path / "thesis.tex").write_text("precious")
    result = invoke("run", "robot_arm", "--out", tmp_path, "--overwrite")
    assert_one_line_error(result, "not empty and holds no jacpipe result")
    assert (tmp_path / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("command", ["compare", "inspect"])
def test_compare_and_inspect_refuse_a_folder_that_is_not_a_result(command, tmp_path):
    assert_one_line_error(invoke(command, tmp_path), "not a jacpipe result")
    assert_one_line_error(invoke(command, tmp_path / "missing"), "not a jacpipe result")


def test_real_subprocess_run_on_embedded_ray(tmp_path):
    out = tmp_path / "sub"
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "heat", "-p", "N=12", "--shards", "4",
         "--num-cpus", "2", "--out", str(out), "--verify"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "MATCH" in proc.stdout
    man = read_doc(out)
    assert man["status"] == "complete" and len(man["shards"]) == 4
    assert all(s["node_id"] != "local" and s["device"] == "cpu" for s in man["shards"])


def test_bench_command_refuses_an_unknown_benchmark():
    result = runner.invoke(app, ["bench", "--only", "nonsense"])
    assert result.exit_code == 2
    assert "unknown benchmark" in result.output or "unknown benchmark" in str(result.stderr)


def test_user_job_module_in_the_current_directory(tmp_path):
    """`jacpipe run localjob:build` finds ./localjob.py without PYTHONPATH (driver and workers)."""
    (tmp_path / "localjob.py").write_text(
        "import torch\nfrom pipeline import Problem\n\n\n"
        "def build(n: int = 7) -> Problem:\n"
        "    w = torch.arange(n * n, dtype=torch.float64).reshape(n, n) / n**2\n"
        "    return Problem(fn=lambda v: torch.sin(w @ v), x=torch.ones(n, dtype=torch.float64))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    jacpipe = os.path.join(os.path.dirname(sys.executable), "jacpipe")
    proc = subprocess.run(
        [jacpipe, "run", "localjob:build", "-p", "n=9", "--shards", "2", "--num-cpus", "2",
         "--out", "o", "--verify"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "MATCH" in proc.stdout


@pytest.mark.parametrize("args,match", [
    (["compare", "__out__", "--rtol", "-1"], "--rtol must be >= 0"),
    (["compare", "__out__", "--all", "--atol", "-1"], "--atol must be >= 0"),
    (["inspect", "__out__", "--plot", "__file__/J.png"], "cannot write it"),
    (["inspect", "__out__", "--plot", "J.txt"], "expected a .png, .svg or .pdf file name"),
    (["run", "mlp", "-p", "n=5", "-p", "n=6"], "parameter 'n' given twice"),
    (["run", "mlp", "--chunk-size", "0"], "--chunk-size must be at least 1"),
])
def test_more_user_errors(ray_session, tmp_path, args, match):
    out = tmp_path / "r"
    if "__out__" in args:
        assert invoke("run", "mlp", *SMALL, "--shards", 2, "--out", out).exit_code == 0
    (tmp_path / "afile").write_text("x")
    args = [str(out) if a == "__out__" else a.replace("__file__", str(tmp_path / "afile"))
            for a in args]
    if args[0] == "run":
        args += ["--out", str(tmp_path / "o2")]
    assert_one_line_error(invoke(*args), match, code=2)


def test_read_jacobian_repeats_duplicate_rows(ray_session, tmp_path):
    out = tmp_path / "r"
    assert invoke("run", "mlp", *SMALL, "--shards", 3, "--out", out).exit_code == 0
    full = read_jacobian(out)
    np.testing.assert_array_equal(read_jacobian(out, rows=[3, 3, 49, 0, 3]), full[[3, 3, 49, 0, 3]])
