"""The cluster commands: `jacpipe submit | status | logs | stop | list`, `make cluster-up`.

Tests marked ``cluster`` run against a real two-node Ray cluster (fixture
``ray_cluster``, :mod:`scripts.localcluster`, the same code as ``make cluster-up``)
with 1 CPU per node, so a job with several shards uses both nodes. The CLI runs
in-process through CliRunner: it is only a client of the cluster's Jobs API, the
job itself runs on the cluster. The others check locally or talk to a fake
dashboard (``tests.dashboard``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from scripts.localcluster import ClusterError, load, main, up
from tests.clitools import one_json
from tests.manifests import read_doc

REPO = Path(__file__).resolve().parents[2]


JACPIPE = str(Path(sys.executable).with_name("jacpipe"))


SMALL = ["-p", "n=160", "-p", "m=120", "-p", "hidden=16", "-p", "dtype=float64"]


def invoke(*args, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False, **kwargs)


def assert_one_line_error(result, match: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    assert match in errors[0], errors[0]


def _wait_for(sid: str, address: str, states: set[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        state = invoke("status", sid, "--address", address, "--json")
        assert state.exit_code == 0, state.output
        status = json.loads(state.output)["status"]
        if status in states or time.monotonic() > deadline:
            return status
        time.sleep(1)


@pytest.mark.cluster
def test_submit_wait_compare_status_logs_list(
    cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sid = f"jacpipe-test-run-{os.getpid()}"
    result = invoke("submit", "mlp", *SMALL, "--shards", 8, "--out", "results/mlp",
                    "--submission-id", sid, "--address", cluster.dashboard_url,
                    "--wait", "--timeout", 300)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == sid
    assert f"job {sid} SUCCEEDED" in result.output
    out = tmp_path / "results" / "mlp"  # relative --out made absolute on submit
    assert "wrote " + str(out) in result.output  # the job's log, streamed

    manifest = read_doc(out)
    assert manifest["status"] == "complete" and len(manifest["shards"]) == 8
    nodes = {s["node_id"] for s in manifest["shards"]}
    assert len(nodes) == 2, nodes  # shards on both nodes
    assert {s["device"] for s in manifest["shards"]} == {"cpu"}
    assert manifest["options"]["gpus_per_shard"] == 0.0

    cmp = invoke("compare", out)
    assert cmp.exit_code == 0 and "MATCH" in cmp.output, cmp.output

    # status / logs / list, the address from the environment (as after
    # `source .cluster/env.sh`)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", cluster.dashboard_url)
    status = invoke("status", sid)
    assert status.exit_code == 0 and status.output.startswith(f"{sid}: SUCCEEDED")
    logs = invoke("logs", sid)
    assert logs.exit_code == 0 and f"wrote {out}" in logs.output
    followed = invoke("logs", sid, "--follow")
    assert followed.exit_code == 0 and f"wrote {out}" in followed.output
    listing = json.loads(invoke("list", "--json").output)
    entry = next(j for j in listing if j["submission_id"] == sid)
    assert entry["status"] == "SUCCEEDED"
    assert f"--out {out}" in entry["entrypoint"] and "--address auto" in entry["entrypoint"]
    table = invoke("list")
    assert table.exit_code == 0 and sid in table.output
    again = invoke("stop", sid)
    assert again.exit_code == 0 and "already ended: SUCCEEDED" in again.output


@pytest.mark.cluster
def test_stop_a_long_job(cluster, tmp_path: Path) -> None:
    result = invoke("submit", "mlp", "-p", "n=3000", "-p", "m=3000", "-p", "hidden=256",
                    "--shards", 300, "--out", tmp_path / "long",
                    "--address", cluster.dashboard_url)
    assert result.exit_code == 0, result.output
    sid = result.stdout.splitlines()[0]
    assert _wait_for(sid, cluster.dashboard_url, {"RUNNING", "SUCCEEDED", "FAILED"}) == "RUNNING"
    stopped = invoke("stop", sid, "--wait", "--address", cluster.dashboard_url)
    assert stopped.exit_code == 0, stopped.output
    assert f"stop requested for job {sid}" in stopped.output
    assert f"job {sid}: STOPPED" in stopped.output
    status = invoke("status", sid, "--address", cluster.dashboard_url)
    assert status.output.startswith(f"{sid}: STOPPED")


@pytest.mark.cluster
def test_submit_wait_reports_a_failed_job(cluster, tmp_path: Path) -> None:
    """A job that fails on the cluster (a job error, not a CLI one): exit 1, one line."""
    # Only the cluster knows it has 2 CPUs: the local checks pass, the job fails there.
    result = invoke("submit", "mlp", "--cpus-per-shard", "64", "--out", tmp_path / "f",
                    "--address", cluster.dashboard_url, "--wait", "--timeout", 180)
    assert result.exit_code == 1 and "Traceback" not in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: job ") and "FAILED" in last, result.output
    assert "exit code 2" in last and "last available logs" not in last
    # the job's own one-line error, streamed from its log (on stderr) before that
    assert "error: --cpus-per-shard 64" in result.stderr
    sid = result.stdout.strip().splitlines()[0]
    status = invoke("status", sid, "--address", cluster.dashboard_url)
    assert "last error: error: --cpus-per-shard 64" in status.stdout, status.output


@pytest.mark.cluster
def test_run_driving_the_cluster_directly(cluster, tmp_path: Path) -> None:
    """`jacpipe run --address HOST:6379` from a machine holding the token: a local driver."""
    env = {k: v for k, v in cluster.env.items() if k != "RAY_API_SERVER_ADDRESS"}
    out = tmp_path / "direct"
    done = subprocess.run(
        [JACPIPE, "run", "mlp", *SMALL, "--shards", "6",
         "--address", cluster.gcs_address, "--out", str(out), "--no-progress"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = read_doc(out)
    assert len({s["node_id"] for s in manifest["shards"]}) == 2


@pytest.mark.cluster
def test_errors_are_one_line(cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = cluster.dashboard_url
    assert_one_line_error(invoke("status", "raysubmit_nope", "--address", url),
                          "no job 'raysubmit_nope'")
    for cmd in (["logs"], ["stop"], ["logs", "--follow"]):
        assert_one_line_error(invoke(*cmd, "raysubmit_nope", "--address", url), "no job")
    assert_one_line_error(invoke("list", "--address", "http://127.0.0.1:1"), "cannot reach")
    assert_one_line_error(
        invoke("submit", "mlp", "--address", "http://127.0.0.1:1"), "cannot reach"
    )
    assert_one_line_error(invoke("submit", "mlp", "--shards", "abc", "--address", url),
                          "Invalid value for '--shards'")
    assert_one_line_error(invoke("submit", "mlp", "--bogus", "--address", url),
                          "No such option: --bogus")
    assert_one_line_error(
        invoke("submit", "mlp", "--out", "s3://KEY:SECRET@bucket/x", "--address", url),
        "credentials in the URI",
    )
    assert_one_line_error(invoke("run", "mlp", "--address", url), "dashboard (Jobs API)")
    # no token anywhere: refused, one line
    for var in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert_one_line_error(invoke("list", "--address", url), "refused")
    assert_one_line_error(invoke("submit", "mlp", "--address", url), "refused")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert_one_line_error(invoke("list"), "no Ray cluster address")


@pytest.mark.cluster
def test_cluster_state_env_file_and_status(cluster) -> None:
    """What `make cluster-up` leaves behind works: `source env.sh`, cluster-status."""
    state = cluster.state_dir
    assert load(state).dashboard_url == cluster.dashboard_url
    assert (state / "auth_token").stat().st_mode & 0o777 == 0o600
    assert cluster.token not in (state / "state.json").read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(
        ["bash", "-c", f"source {state}/env.sh && {JACPIPE} list --json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), list)
    status = subprocess.run(
        ["scripts/cluster.sh", "status"], cwd=REPO, capture_output=True, text=True,
        env={**env, "CLUSTER_STATE": str(state)}, timeout=60,
    )
    assert status.returncode == 0 and "2 node(s) alive" in status.stdout, status.stdout
    with pytest.raises(ClusterError, match="already up"):
        up(state)


@pytest.mark.cluster
def test_cluster_down_without_a_cluster(tmp_path: Path, capsys) -> None:
    assert main(["down", "--state-dir", str(tmp_path / "none")]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert main(["status", "--state-dir", str(tmp_path / "none")]) == 1


@pytest.mark.cluster
def test_make_targets_call_the_script() -> None:
    for target, action in (("cluster-up", "up"), ("cluster-down", "down"),
                           ("cluster-status", "status")):
        dry = subprocess.run(["make", "-n", target], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
        assert f"scripts/cluster.sh {action}" in dry.stdout, dry.stdout + dry.stderr


UNREACHABLE = "http://127.0.0.1:9"  # discard port: nothing answers


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


@pytest.mark.slow
def test_cluster_env_file_defines_an_unset_helper():
    import subprocess

    from scripts.localcluster import UNSET_HELPER

    script = ("export RAY_AUTH_MODE=token RAY_API_SERVER_ADDRESS=http://x:1\n" + UNSET_HELPER
              + "jacpipe_cluster_unset\n"
              + 'echo "${RAY_AUTH_MODE-none} ${RAY_API_SERVER_ADDRESS-none}"')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none none"


#: Processes of a local cluster that Ray 2.60 lets listen beyond 127.0.0.1 whatever
#: ``ray start`` is told (it swaps a loopback --node-ip-address for the routable
#: one; gRPC servers and metrics exporters then bind every interface). Every one
#: of them needs the cluster's token, or serves only metrics: README, "Listening
#: ports".
ALLOWED_ANY_ADDRESS = frozenset({
    "gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard.py",
    "monitor.py", "ray.util.client.server",
})


@pytest.mark.cluster
def test_the_local_cluster_listens_on_loopback_only(ray_cluster) -> None:
    """The Jobs API is on 127.0.0.1 only; nothing outside the allow-list listens elsewhere."""
    sockets = ray_cluster.listening()
    names = {name for name, _, _ in sockets}
    assert {"gcs_server", "raylet", "ray::DashboardAgent"} <= names, sockets
    exposed = [(name, addr, port) for name, addr, port in sockets
               if not addr.startswith("127.") and addr != "::1"]
    assert {name for name, _, _ in exposed} <= ALLOWED_ANY_ADDRESS, sockets
    dash_port = int(ray_cluster.dashboard_url.rsplit(":", 1)[1])
    assert [s for s in exposed if s[2] == dash_port] == [], sockets
    assert any(port == dash_port for _, _, port in sockets), sockets


def _complete(words: str, cword: int, env: dict) -> list[str]:
    """What bash completion offers for ``words`` (the word at ``cword`` being typed)."""
    env = {**env, "_JACPIPE_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(cword)}
    result = CliRunner().invoke(app, [], env=env, prog_name="jacpipe")
    assert result.exit_code == 0, result.output
    return result.output.split()


def test_submission_ids_complete_from_the_local_record(tmp_path, monkeypatch):
    """``jacpipe status|logs|stop <TAB>``: the ids this user submitted, newest first, offline."""
    from pipeline.cli import cluster as cmds
    from pipeline.runner import submit as sub

    env = {"XDG_STATE_HOME": str(tmp_path / "state")}
    monkeypatch.setenv("XDG_STATE_HOME", env["XDG_STATE_HOME"])
    ids = iter(["raysubmit_aaa", "raysubmit_abc", "nightly-1"])
    monkeypatch.setattr(sub, "submit", lambda *a, **k: next(ids))
    for _ in range(3):
        result = invoke("submit", "mlp", *SMALL, "--out", tmp_path / "o", "--address",
                        "http://127.0.0.1:9")
        assert result.exit_code == 0, result.output
    assert cmds.submissions_file() == tmp_path / "state" / "jacpipe" / "submissions.jsonl"
    for command in ("status", "logs", "stop"):
        assert _complete(f"jacpipe {command} ", 2, env) == [
            "nightly-1", "raysubmit_abc", "raysubmit_aaa"]
        assert _complete(f"jacpipe {command} raysubmit_ab", 2, env) == ["raysubmit_abc"]
        assert _complete(f"jacpipe {command} zz", 2, env) == []
    with cmds.submissions_file().open("a") as f:
        f.write('{"id": "raysubmit_aaa"}\nnot json\n{"job": "no id"}\n[1]\n')
    assert [sid for sid, _ in cmds.complete_submission("r")] == ["raysubmit_aaa",
                                                                 "raysubmit_abc"]
    sid, what = cmds.complete_submission("raysubmit_abc")[0]
    assert what.startswith("mlp, submitted ") and what.endswith(" to http://127.0.0.1:9")


def test_the_record_keeps_the_newest_and_a_record_it_cannot_write_costs_only_completion(
    tmp_path, monkeypatch
):
    from pipeline.cli import cluster as cmds

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(cmds, "_REMEMBERED", 3)
    for i in range(5):
        cmds.remember_submission(f"id{i}", "mlp", None)
    assert [sid for sid, _ in cmds.complete_submission("")] == ["id4", "id3", "id2"]
    assert "to the default address" in cmds.complete_submission("id4")[0][1]
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "file"))  # a file, not a folder
    cmds.remember_submission("lost", "mlp", None)  # no error: only completion needs it
    assert cmds.complete_submission("") == []
