"""The front door: CLI conventions, --json documents, submit's checks and race, export, plots."""

from __future__ import annotations

import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import scipy.sparse as sp
from typer.testing import CliRunner

from pipeline import read_jacobian
from pipeline.cli import app
from tests.manifests import read_doc, write_doc

runner = CliRunner()
UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing answers


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_json(result):
    """stdout is exactly one JSON document."""
    doc, end = json.JSONDecoder().raw_decode(result.stdout.strip())
    assert end == len(result.stdout.strip()), result.stdout
    return doc


# ---------------------------------------------------------------------------
# conventions
# ---------------------------------------------------------------------------


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


def test_help_choices_are_the_library_ones():
    from pipeline.core import options as plan
    from pipeline.core.options import CHOICES

    assert CHOICES["device"] == plan.DEVICES
    assert CHOICES["dtype"] == plan.DTYPES
    assert CHOICES["method"] == plan.METHODS
    assert CHOICES["executor"] == plan.EXECUTORS


# ---------------------------------------------------------------------------
# submit: local checks, and the address race
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv,match", [
    (["nope"], "unknown job 'nope'"),
    (["mlp", "-p", "n=abc"], "parameter 'n': expected int"),
    (["mlp", "-p", "zz=1"], "unknown parameter 'zz'"),
    (["mlp", "--device", "tpu"], "--device must be"),
])
def test_submit_checks_locally_before_contacting_a_cluster(argv, match):
    result = invoke("submit", *argv, "--address", UNREACHABLE)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], result.output
    assert "dashboard" not in errors[0]


def _job(sid, status="RUNNING", message=None):
    return {"type": "SUBMISSION", "job_id": None, "submission_id": sid, "driver_info": None,
            "status": status, "entrypoint": "python -m pipeline.cli run mlp", "message": message,
            "error_type": None, "start_time": 1_700_000_000_000, "end_time": None,
            "metadata": {}, "runtime_env": {}, "driver_agent_http_address": None,
            "driver_node_id": None}


FAILED_LOG = "running...\nerror: parameter 'n': expected int, got 'abc'\n"


class _Dashboard(BaseHTTPRequestHandler):
    """Just enough of the Ray Jobs API: version, one job's info and logs, the list."""

    def do_GET(self):  # noqa: N802 - http.server's name
        path = self.path.rstrip("/")
        if path == "/api/version":
            body = {"version": "4", "ray_version": "2.60.0", "ray_commit": "x"}
        elif path == "/api/jobs":
            body = [_job("ok"), _job("bad", "FAILED", "Job entrypoint command failed with "
                                     "exit code 2, last available logs:\n" + FAILED_LOG)]
        elif path.endswith("/logs"):
            body = {"logs": FAILED_LOG if "/bad/" in path else "hello\n"}
        else:
            sid = path.rsplit("/", 1)[1]
            body = _job(sid, "FAILED", "Job entrypoint command failed with exit code 2"
                        ) if sid == "bad" else _job(sid)
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        del args


@pytest.fixture()
def dashboard(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dashboard)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", url)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    yield url
    server.shutdown()


def test_concurrent_status_and_log_calls_never_lose_the_address(dashboard):
    from pipeline.runner import submit as sub

    failures: list[str] = []

    def hammer(i):
        for _ in range(8):
            try:
                assert sub.status(f"job{i}", None) == "RUNNING"
                assert sub.logs(f"job{i}", None) == "hello\n"
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                failures.append(repr(exc))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert os.environ["RAY_API_SERVER_ADDRESS"] == dashboard


def test_status_of_a_failed_job_names_its_last_error_and_json_is_one_document(dashboard):
    text = invoke("status", "bad")
    assert "FAILED" in text.stdout
    assert "last error: error: parameter 'n': expected int" in text.stdout
    doc = one_json(invoke("status", "bad", "--json"))
    assert doc["status"] == "FAILED" and "expected int" in doc["error"]
    jobs = one_json(invoke("list", "--json"))
    assert [j["submission_id"] for j in jobs] == ["ok", "bad"]


def test_last_error_line_prefers_error_lines():
    from pipeline.cli.cluster import last_error_line

    assert last_error_line("a\nValueError: x\nerror: the one\nbye\n") == "error: the one"
    assert last_error_line("a\nTraceback\nValueError: x\n") == "ValueError: x"
    assert last_error_line("all good\n") is None


# ---------------------------------------------------------------------------
# results: --json documents, batched display, plots, export
# ---------------------------------------------------------------------------


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


@pytest.mark.parametrize("name,match", [
    ("J.safetensors", "does not depend on"), ("J.zarr", "does not depend on"),
    ("J.txt", "expected a file name ending in .npy"),
])
def test_export_refuses_other_formats(results, tmp_path, name, match):
    root, _ = results
    result = invoke("export", root / "dense", tmp_path / name)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and match in errors[0]


# ---------------------------------------------------------------------------
# stale cluster variables
# ---------------------------------------------------------------------------


def test_stale_cluster_variables_are_one_line(tmp_path):
    from pipeline.core.errors import JacpipeError
    from pipeline.runner.cluster import refuse_stale_cluster_env

    refuse_stale_cluster_env({})
    refuse_stale_cluster_env({"RAY_ADDRESS": "local"})
    with pytest.raises(JacpipeError, match="RAY_ADDRESS=127.0.0.1:9 is set but no Ray") as exc:
        refuse_stale_cluster_env({"RAY_ADDRESS": "127.0.0.1:9"})
    assert "unset RAY_ADDRESS" in str(exc.value) and "\n" not in str(exc.value)
    gone = str(tmp_path / ".cluster" / "auth_token")
    with pytest.raises(JacpipeError, match="RAY_AUTH_MODE=token is set but the token file"):
        refuse_stale_cluster_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": gone})
    (tmp_path / "token").write_text("t0k3n\n")
    refuse_stale_cluster_env({"RAY_AUTH_MODE": "token",
                              "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")})
    refuse_stale_cluster_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x"})


def test_cluster_env_file_defines_an_unset_helper():
    import subprocess

    from scripts.localcluster import UNSET_HELPER

    script = ("export RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://x:1\n" + UNSET_HELPER
              + "jacpipe_cluster_unset\n"
              + 'echo "${RAY_AUTH_MODE-none} ${RAY_API_SERVER_ADDRESS-none}"')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none none"
