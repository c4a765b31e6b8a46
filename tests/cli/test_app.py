"""Every command through Typer's CliRunner: conventions, --json documents, user errors."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from torch.autograd.functional import jacobian
from typer.testing import CliRunner

from pipeline import read_jacobian
from pipeline.cli import app
from pipeline.problem.problem import build_problem
from tests.clitools import one_json
from tests.manifests import read_doc, write_doc
from tests.maths.kindrefs import HESSIAN_JOBS

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


@pytest.mark.slow
def test_help_imports_neither_torch_nor_ray():
    # main() ends the process (NOTE: [A quick exit]); its exit handlers still run
    code = ("import atexit, sys\n"
            "atexit.register(lambda: print(sorted(m for m in ('torch', 'ray', 'pyarrow')\n"
            "                                     if m in sys.modules)))\n"
            "from pipeline.cli import main; sys.argv=['jacpipe','--help']\n"
            "main()\n")
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


@pytest.mark.parametrize("job,guess", [
    ("mpl", "mlp"),
    ("examples/my_job.py", "examples.my_job:build"),
    ("examples.my_job", "examples.my_job:build"),
])
def test_a_mistyped_job_gets_one_line_with_a_suggestion(job, guess, tmp_path):
    result = invoke("run", job, "--out", tmp_path / "o")
    assert_one_line_error(result, f"did you mean '{guess}'?")
    assert not (tmp_path / "o").exists()


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


@pytest.mark.parametrize("command", ["compare", "inspect"])
def test_compare_and_inspect_say_a_missing_folder_does_not_exist(command, tmp_path):
    result = invoke(command, tmp_path / "missing")
    assert_one_line_error(result, "does not exist")
    assert "_manifest.parquet" not in result.output


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_readme_smoothing_commands_run(ray_session, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Non-smooth functions"):]
    section = section[:section.index("\n## ", 5)]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line in "".join(blocks).splitlines():
        for part in line.split("#")[0].split("&&"):
            if part.strip():
                argv = shlex.split(part.strip())
                assert argv[0] == "jacpipe"
                res = CliRunner().invoke(app, argv[1:], catch_exceptions=False)
                assert res.exit_code == 0, (argv, res.output)
                ran += 1
    assert ran >= 3


def test_version_and_short_help():
    from pipeline import __version__

    assert invoke("--version").stdout.strip() == f"jacpipe {__version__}"
    for argv in (["-h"], ["run", "-h"], ["submit", "-h"], ["export", "-h"]):
        result = invoke(*argv)
        assert result.exit_code == 0 and "Usage" in result.stdout, argv


def test_help_shows_types_choices_defaults_and_an_example():
    text = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).stdout
    assert "<str>" not in text and "<bool>" not in text and "<int>" not in text
    assert "[auto|cpu|cuda]" in text and "[float32|float64]" in text
    assert "[auto|rev|fwd|sparse]" in text
    assert "[default: out/JOB]" in text
    assert "Example: jacpipe run" in text
    submit = runner.invoke(app, ["submit", "--help"], env={"COLUMNS": "200"}).stdout
    assert "Forwarded to `jacpipe run`" in submit and "--shard-timeout" in submit
    assert "--install-completion" in invoke("--help").stdout


@pytest.fixture(scope="module")
def results(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("frontdoor")
    runs = {
        "dense": ["mlp", "-p", "n=12", "-p", "m=9", "-p", "hidden=4", "--shards", 2],
        "sparse": ["banded", "-p", "n=40", "-p", "k=2", "--shards", 2],
        "batched": ["robot_arm", "-p", "batch=5", "--shards", 2],
    }
    docs = {}
    for name, argv in runs.items():
        result = invoke("run", *argv, "--out", root / name, "--json", "--no-progress")
        assert result.exit_code == 0, result.output
        docs[name] = one_json(result)
    return root, docs


def test_run_json_is_one_document(results):
    root, docs = results
    assert docs["dense"]["shape"] == [9, 12] and docs["dense"]["computed"] == 2
    again = invoke("run", "mlp", "-p", "n=12", "-p", "m=9", "-p", "hidden=4", "--shards", 2,
                   "--out", root / "dense", "--json", "--verify")
    doc = one_json(again)
    assert doc["resumed"] == 2 and doc["compare"]["ok"] is True


def test_compare_and_inspect_json_are_one_document(results):
    root, _ = results
    cmp = one_json(invoke("compare", root / "dense", "--json"))
    assert cmp["ok"] is True
    both = one_json(invoke("compare", root / "dense", "--fd", "--json"))
    assert set(both) == {"compare", "fd", "ok"} and both["compare"]["ok"] is True
    info = one_json(invoke("inspect", root / "sparse", "--json"))
    assert info["layout"] == "sparse"


def test_batched_results_show_as_b_by_m_by_n(results, tmp_path):
    root, _ = results
    info = one_json(invoke("inspect", root / "batched", "--json"))
    assert info["display_shape"] == "5 x (6 x 6)" or info["display_shape"].startswith("5 x (")
    table = runner.invoke(app, ["inspect", str(root / "batched")], env={"COLUMNS": "200"})
    assert info["display_shape"] in table.stdout
    result = invoke("inspect", root / "batched", "--plot", tmp_path / "b.png")
    assert result.exit_code == 0 and (tmp_path / "b.png").stat().st_size > 0


@pytest.mark.parametrize("ext,magic", [("png", b"\x89PNG"), ("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_plot_format_follows_the_extension(results, tmp_path, ext, magic):
    root, _ = results
    path = tmp_path / f"J.{ext}"
    result = invoke("inspect", root / "dense", "--plot", path)
    assert result.exit_code == 0, result.output
    assert path.read_bytes().startswith(magic)


def test_inspect_of_an_unfinished_result_is_one_summary_line(results, tmp_path):
    import shutil

    root, _ = results
    out = tmp_path / "partial"
    shutil.copytree(root / "dense", out)
    man = read_doc(out)
    man["shards"] = man["shards"][:1]
    man["status"] = "interrupted"
    write_doc(out, man)
    (out / "part-00001.parquet").unlink()
    result = invoke("inspect", out)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1
    assert errors == ["error: 1 of 2 shards committed; rerun the same command to resume"]
    assert len(one_json(invoke("inspect", out, "--json"))["problems"]) == 1


@pytest.mark.parametrize("name", ["dense", "sparse", "batched"])
def test_export_round_trips(results, tmp_path, name):
    root, _ = results
    want = read_jacobian(root / name)
    dense = want.toarray() if sp.issparse(want) else want
    npy = tmp_path / "J.npy"
    doc = one_json(invoke("export", root / name, npy, "--json"))
    got = np.load(npy)
    assert got.dtype == dense.dtype and list(got.shape) == doc["shape"]
    np.testing.assert_array_equal(got, dense)
    npz = tmp_path / "J.npz"
    assert invoke("export", root / name, npz).exit_code == 0
    csr = sp.load_npz(npz)
    np.testing.assert_array_equal(csr.toarray(), dense.reshape(csr.shape))
    if sp.issparse(want):
        assert csr.nnz == want.nnz
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_refuses_an_existing_file_unless_overwrite(results, tmp_path):
    """``export`` used to replace an existing file without a word."""
    root, _ = results
    npy = tmp_path / "J.npy"
    npy.write_bytes(b"precious")
    result = invoke("export", root / "dense", npy)
    assert_one_line_error(result, "exists; pass --overwrite to replace it", code=2)
    assert npy.read_bytes() == b"precious"
    assert invoke("export", root / "dense", npy, "--overwrite").exit_code == 0
    np.testing.assert_array_equal(np.load(npy), read_jacobian(root / "dense"))


def test_a_sparse_result_exported_dense_says_so(results, tmp_path):
    """A sparse result written to a dense ``.npy`` used to pass without a word."""
    root, _ = results
    result = runner.invoke(app, ["export", str(root / "sparse"), str(tmp_path / "J.npy")])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "dense" in notes[0] and ".npz" in notes[0], result.output
    assert "stored entries" in notes[0]
    result = runner.invoke(app, ["export", str(root / "sparse"), str(tmp_path / "J.npz")])
    assert result.exit_code == 0 and "note:" not in result.output
    dense = runner.invoke(app, ["export", str(root / "dense"), str(tmp_path / "D.npy")])
    assert dense.exit_code == 0 and "note:" not in dense.output


@pytest.mark.parametrize("name,match", [
    ("J.safetensors", "does not depend on"), ("J.zarr", "does not depend on"),
    ("J.txt", "expected a file name ending in .npy"),
])
def test_export_refuses_other_formats(results, tmp_path, name, match):
    root, _ = results
    result = invoke("export", root / "dense", tmp_path / name)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and match in errors[0]


@pytest.mark.parametrize("args", [
    ["rosenbrock", "-p", "n=50", "--shards", "3"],
    ["rosenbrock", "-p", "n=20", "-p", "pattern=true", "--dtype", "float32"],
    ["trajectory", "-p", "waypoints=10", "--dtype", "float32"],
    ["cnn", "-p", "batch=3", "-p", "channels=2", "--dtype", "float64"],
    ["cnn", "-p", "batch=2", "-p", "channels=2", "--rows-per-shard", "7"],
    ["robot_arm", "-p", "batch=20", "--rows-per-shard", "7", "--dtype", "float32"],
    ["netparams", "-p", "batch=3", "-p", "classes=4", "--shards", "2", "--dtype", "float64"],
])
def test_every_new_job_runs_and_verifies_through_the_cli(ray_session, tmp_path, args):
    result = invoke("run", *args, "--out", tmp_path / "o", "--verify")
    assert result.exit_code == 0, result.output
    assert "MATCH" in result.output and "MISMATCH" not in result.output
    kind = "hessian" if args[0] in HESSIAN_JOBS else "batched"
    assert ("symmetry" in result.output) == (kind == "hessian")
    info = json.loads(invoke("compare", tmp_path / "o", "--rows", 5, "--json").output)
    assert info["ok"] and info["mode"] == "sampled" and info["rows_checked"] == 5
    assert (info["symmetry_error"] is not None) == (kind == "hessian")


def test_new_jobs_are_listed_with_a_description():
    listing = {item["job"]: item for item in json.loads(invoke("jobs", "--json").output)}
    for job in ("cnn", "rosenbrock", "trajectory"):
        assert listing[job]["doc"] and "dtype" in listing[job]["params"]
    assert listing["rosenbrock"]["params"]["pattern"] is False


def test_rows_without_verify_is_refused_before_any_work(tmp_path):
    """``run --rows 5`` without ``--verify`` used to be ignored without a word."""
    out = tmp_path / "o"
    result = invoke("run", "mlp", *SMALL, "--rows", "5", "--out", out, "--executor", "local")
    assert_one_line_error(result, "--rows only applies with --verify", code=2)
    assert not out.exists()


def test_sigterm_during_run_verify_is_one_line_and_exit_143(tmp_path, monkeypatch):
    import signal

    import pipeline.analysis.compare as compare_mod

    def sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM was not turned into an interrupt")

    monkeypatch.setattr(compare_mod, "compare", sigterm)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "o"
    result = invoke("run", "mlp", "-p", "n=4", "-p", "m=3", "--executor", "local", "--verify",
                    "--out", out)
    assert result.exit_code == 143, result.output
    line = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert line == [f"error: terminated (SIGTERM) during --verify: the result in {out} is "
                    f"complete but unchecked; check it with `jacpipe compare {out}`"]
    assert signal.getsignal(signal.SIGTERM) is before
    assert read_doc(out)["status"] == "complete"


@pytest.mark.slow  # a subprocess
def test_sigterm_before_the_run_folder_is_prepared_is_one_line(tmp_path):
    """SIGTERM while the job builds (or ``--address`` connects): exit 143, one line, no folder."""
    import signal
    import time

    out, ready = tmp_path / "out", tmp_path / "ready"
    env = dict(os.environ, PYTHONPATH=os.getcwd(), NO_COLOR="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "tests.userjobs:waits_in_build", "-p",
         f"ready={ready}", "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    # progress phases may precede it on stderr; the error is one line, and the last
    assert [ln for ln in stderr.splitlines() if ln.startswith("error:")] == [
        "error: terminated (SIGTERM) before any shard ran; rerun the same command"], stderr
    assert stderr.splitlines()[-1].startswith("error:") and "Traceback" not in stderr, stderr
    assert not out.exists()


def test_the_quick_exit_runs_the_exit_handlers_flushes_and_keeps_the_status(tmp_path):
    """NOTE: [A quick exit]: atexit handlers, flushed streams, the status; no teardown."""
    code = ("import atexit, sys\n"
            "from pipeline.cli.app import _exit_quickly\n"
            "atexit.register(lambda: print('handler ran'))\n"
            "sys.stdout.write('pending output, ')\n"
            "_exit_quickly(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])\n")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for arg, status, err in (("0", 0, ""), ("3", 3, ""), ("a message", 1, "a message")):
        proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == status, proc.stderr
        assert proc.stdout == "pending output, handler ran\n" and err in proc.stderr


def test_the_quick_exit_waits_for_a_thread_at_work():
    import threading

    from pipeline.cli.app import _exit_quickly

    done = threading.Event()
    worker = threading.Thread(target=done.wait, daemon=False)
    worker.start()
    try:
        with pytest.raises(SystemExit) as exc:  # the ordinary exit, which joins it
            _exit_quickly(4)
        assert exc.value.code == 4
    finally:
        done.set()
        worker.join()


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_lets_openmp_threads_sleep_unless_told(given, expected):
    """NOTE: [OpenMP threads that sleep]: PASSIVE before torch is imported, unless set."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    code = ("import os, sys, pipeline.cli; "
            "print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.split() == [expected, "False"]
