"""``pipeline.runner.submit``: the Jobs API client (cluster tests marked)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.core.errors import JacpipeError
from pipeline.runner import submit as sub


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Ray address or token variables; HOME without ~/.ray."""
    for var in (
        "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_AUTH_MODE",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


@pytest.fixture
def any_token(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``clean_env`` plus some token: Ray caches its auth mode per process (in C++), so
    after a token-mode cluster test a tokenless request fails before any connection."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", "0" * 32)
    return clean_env


@pytest.mark.parametrize(
    ("given", "want"),
    [
        ("http://10.0.0.5:8265", "http://10.0.0.5:8265"),
        ("http://10.0.0.5:8265/", "http://10.0.0.5:8265"),
        ("10.0.0.5:8265", "http://10.0.0.5:8265"),
        ("head", "http://head:8265"),
        ("https://ray.example.org", "https://ray.example.org:443"),
        ("http://[::1]:9000", "http://[::1]:9000"),
    ],
)
def test_normalize_address(clean_env: Path, given: str, want: str) -> None:
    assert sub.normalize_address(given) == want


def test_normalize_address_env_fallback(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "h2:8265")
    assert sub.normalize_address(None) == "http://h2:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://h1:8265")
    assert sub.normalize_address("") == "http://h1:8265"
    assert sub.normalize_address("h3") == "http://h3:8265"  # explicit wins


@pytest.mark.parametrize("bad", [None, "auto", "ray://h:10001", "http://h:port"])
def test_normalize_address_rejects(clean_env: Path, bad: str | None) -> None:
    with pytest.raises(JacpipeError) as err:
        sub.normalize_address(bad)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["not a url", "http://no host:8265", "head!:8265", "he%ad"])
def test_an_address_that_is_no_host_name_is_one_line(clean_env: Path, bad: str) -> None:
    with pytest.raises(JacpipeError, match="is not a host name") as err:
        sub.normalize_address(bad)
    assert "expected http://HEAD:8265" in str(err.value)


def test_list_with_an_address_that_is_not_a_url_is_one_line(clean_env: Path) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app
    from tests.clitools import error_line

    result = CliRunner().invoke(app, ["list", "--address", "not a url"])
    line = error_line(result)
    assert result.exit_code == 2
    assert line.startswith("error: --address='not a url': 'not a url' is not a host name")
    assert "JACPIPE_DEBUG" not in line


def test_auth_headers_precedence(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert sub.auth_headers() == {}
    (clean_env / ".ray").mkdir()
    (clean_env / ".ray" / "auth_token").write_text("home\n")
    assert sub.auth_headers() == {"Authorization": "Bearer home"}
    path = clean_env / "tok"
    path.write_text("fromfile")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert sub.auth_headers() == {"Authorization": "Bearer fromfile"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert sub.auth_headers() == {"Authorization": "Bearer fromenv"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert sub.auth_headers() == {}
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(clean_env / "missing"))
    with pytest.raises(JacpipeError, match="RAY_AUTH_TOKEN_PATH"):
        sub.auth_headers()


def test_build_entrypoint() -> None:
    cmd = sub.build_entrypoint("mlp", ["-p", "n=4", "--out", "/data/out dir"])
    assert shlex.split(cmd) == [
        "python", "-m", "pipeline.cli", "run", "mlp",
        "-p", "n=4", "--out", "/data/out dir", "--address", "auto",
    ]  # fmt: skip
    with pytest.raises(JacpipeError, match="--address"):
        sub.build_entrypoint("mlp", ["--address=x"])


def test_ship_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "userjob_single.py").write_text("def build():\n    return 1\n")
    pkg = tmp_path / "userpkg_x"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)  # found through the cwd fallback, not sys.path
    names = {p.name for p in sub.ship_paths("userjob_single:build")}
    assert names == {"pipeline", "jobs", "userjob_single.py"}
    paths = sub.ship_paths("userpkg_x.sub:build", extra_modules=["json"])
    assert {p.name for p in paths} == {"pipeline", "jobs", "userpkg_x"}  # json: stdlib
    assert {p.name for p in sub.ship_paths("mlp")} == {"pipeline", "jobs"}
    with pytest.raises(JacpipeError, match="cannot find module 'no_such_mod_zz'"):
        sub.ship_paths("no_such_mod_zz:build")


def test_stage_leaves_out_caches(tmp_path: Path) -> None:
    src = tmp_path / "pkgq"
    (src / "__pycache__").mkdir(parents=True)
    (src / "__init__.py").write_text("")
    (src / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"0")
    (src / "big.parquet").write_bytes(b"0")
    dest = tmp_path / "stage"
    dest.mkdir()
    sub._stage([src], dest)
    assert sorted(p.name for p in (dest / "pkgq").iterdir()) == ["__init__.py"]


def test_unreachable_address_fails_fast(any_token: Path) -> None:
    started = time.monotonic()
    with pytest.raises(JacpipeError, match="cannot reach the Ray dashboard at http://127.0.0.1:1"):
        sub.status("raysubmit_x", "http://127.0.0.1:1")
    with pytest.raises(JacpipeError, match="cannot reach"):
        sub.list_jobs("127.0.0.1:1")
    assert time.monotonic() - started < 15


def test_silent_server_times_out(any_token: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port that accepts connections but never answers must not hang the client."""
    monkeypatch.setattr(sub, "HTTP_TIMEOUT", (1.0, 1.0))
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        port = srv.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(JacpipeError, match="did not answer"):
            sub.list_jobs(f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 15


def test_not_a_dashboard(any_token: Path) -> None:
    """An HTTP server that is not Ray: a clear error, not a traceback."""
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(JacpipeError, match="not a Ray dashboard"):
            sub.list_jobs(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()


def _py(code: str) -> str:
    """A ``python -c`` entrypoint for ``code``."""
    return shlex.join(["python", "-c", textwrap.dedent(code)])


@pytest.mark.cluster
def test_submit_ships_packages_not_venv(
    cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "userjob_zq.py").write_text("def build():\n    return 'user-ok'\n")
    monkeypatch.chdir(tmp_path)
    code = """
        import json, os, pipeline, jobs, userjob_zq
        here = os.getcwd()
        print("ok", json.dumps({
            "listing": sorted(os.listdir(here)),
            "pipeline_shipped": pipeline.__file__.startswith(here),
            "jobs_shipped": jobs.__file__.startswith(here),
            "user": userjob_zq.build(),
            "pycache": any("__pycache__" in d for d, _, _ in os.walk(here)),
        }))
    """
    sid = sub._submit_entrypoint(
        _py(code),
        address=cluster.dashboard_url,
        paths=sub.ship_paths("userjob_zq:build"),
        submission_id=f"jacpipe-test-ship-{os.getpid()}",
    )
    assert sub.wait(sid, cluster.dashboard_url, timeout=90) == "SUCCEEDED", sub.logs(
        sid, cluster.dashboard_url
    )
    text = sub.logs(sid, cluster.dashboard_url)
    line = next(ln for ln in text.splitlines() if ln.startswith("ok "))
    facts = json.loads(line[3:])
    assert facts["listing"] == ["jobs", "pipeline", "userjob_zq.py"]
    assert facts["pipeline_shipped"] and facts["jobs_shipped"]
    assert facts["user"] == "user-ok" and not facts["pycache"]
    assert sid in {j["submission_id"] for j in sub.list_jobs(cluster.dashboard_url)}
    # same id twice: a clear error
    with pytest.raises(JacpipeError, match="already exists"):
        sub._submit_entrypoint("true", address=cluster.dashboard_url, submission_id=sid)


@pytest.mark.cluster
def test_explicit_address_wins_over_env(cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's client lets RAY_ADDRESS override its argument; ours must not."""
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    assert isinstance(sub.list_jobs(cluster.dashboard_url), list)
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:1"  # restored


@pytest.mark.cluster
def test_stop_long_job(cluster) -> None:
    sid = sub._submit_entrypoint("sleep 60", address=cluster.dashboard_url)
    assert sub.status(sid, cluster.dashboard_url) in {"PENDING", "RUNNING"}
    assert sub.stop(sid, cluster.dashboard_url) is True
    started = time.monotonic()
    assert sub.wait(sid, cluster.dashboard_url, timeout=45) == "STOPPED"
    assert time.monotonic() - started < 45
    assert sub.stop(sid, cluster.dashboard_url) is False


@pytest.mark.cluster
def test_wait_timeout_and_follow_logs(cluster) -> None:
    sid = sub._submit_entrypoint(
        "echo first-line; sleep 2; echo second-line", address=cluster.dashboard_url
    )
    with pytest.raises(JacpipeError, match="still"):
        sub.wait(sid, cluster.dashboard_url, timeout=0.1)
    text = "".join(sub.follow_logs(sid, cluster.dashboard_url))
    assert "first-line" in text and "second-line" in text
    assert sub.wait(sid, cluster.dashboard_url, timeout=30) == "SUCCEEDED"


@pytest.mark.cluster
def test_unknown_id(cluster) -> None:
    for call in (sub.status, sub.logs, sub.stop, sub.info):
        with pytest.raises(JacpipeError, match="no job 'raysubmit_nope'") as err:
            call("raysubmit_nope", cluster.dashboard_url)
        assert "\n" not in str(err.value)
    with pytest.raises(JacpipeError, match="no job"):
        list(sub.follow_logs("raysubmit_nope", cluster.dashboard_url))
    with pytest.raises(JacpipeError, match="no job"):
        sub.wait("raysubmit_nope", cluster.dashboard_url, timeout=5)


@pytest.mark.cluster
def test_wrong_or_missing_token(cluster, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(JacpipeError, match="refused.*token") as err:
        sub.list_jobs(cluster.dashboard_url)
    assert "\n" not in str(err.value)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token either
    with pytest.raises(JacpipeError, match="refused.*token"):
        sub.status("raysubmit_x", cluster.dashboard_url)


_BOTH_NODES = """
    import json, ray
    ray.init(address="auto")
    @ray.remote(num_cpus=0)
    def where():
        return ray.get_runtime_context().get_node_id()
    ids = ray.get([where.options(resources={r: 0.01}).remote() for r in RES])
    print("NODES " + json.dumps({"tasks": ids, "driver": ray.get_runtime_context().get_node_id(),
          "alive": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])}))
"""


def _nodes_line(text: str) -> dict:
    return json.loads(next(ln for ln in text.splitlines() if ln.startswith("NODES "))[6:])


@pytest.mark.cluster
def test_submitted_driver_runs_tasks_on_both_nodes(cluster) -> None:
    code = _BOTH_NODES.replace("RES", repr(list(cluster.resources)))
    sid = sub._submit_entrypoint(_py(code), address=cluster.dashboard_url)
    assert sub.wait(sid, cluster.dashboard_url, timeout=90) == "SUCCEEDED", sub.logs(
        sid, cluster.dashboard_url
    )
    facts = _nodes_line(sub.logs(sid, cluster.dashboard_url))
    assert len(set(facts["tasks"])) == 2
    assert sorted(facts["tasks"]) == facts["alive"]
    assert facts["driver"] == facts["tasks"][0]  # the entrypoint runs on the head


@pytest.mark.cluster
def test_direct_driver_with_gcs_address(cluster, tmp_path: Path) -> None:
    """``ray.init(address=HOST:PORT)`` from a plain process (what `run --address` does)."""
    code = textwrap.dedent(_BOTH_NODES).replace("RES", repr(list(cluster.resources)))
    code = code.replace('address="auto"', f"address={cluster.gcs_address!r}")
    env = {k: v for k, v in cluster.env.items() if k != "RAY_API_SERVER_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(set(_nodes_line(done.stdout)["tasks"])) == 2


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
