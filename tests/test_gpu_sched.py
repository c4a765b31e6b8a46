"""GPU scheduling with fake GPUs: Ray is told of 2 GPUs, torch sees none (CPU fallback).

The Ray part runs in a subprocess with its own ``ray.init(num_gpus=2)``: the
session's shared Ray has no GPUs and cannot be given some afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.core.errors import JacpipeError
from pipeline.runner import worker

SMALL = ["n=40", "m=48", "hidden=8"]

_SCRIPT = """
    import json, sys
    import ray
    from pipeline.core.errors import JacpipeError
    from pipeline.runner.driver import RunOptions, run
    from tests.manifests import read_doc

    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, logging_level="ERROR")
    out = sys.argv[1]
    small = SMALL

    def go(name, **kw):
        opts = dict(job="mlp", params=small, shards=8, out=f"{out}/{name}", progress=False)
        opts.update(kw)
        try:
            return run(RunOptions(**opts), echo=lambda s: None).manifest
        except JacpipeError as exc:
            return {"error": str(exc)}

    def cli(name, *args):
        # The command line, as in the README's GPU section; run() finds this Ray initialised.
        from typer.testing import CliRunner
        from pipeline.cli import app

        argv = ["run", "mlp", *[a for p in small for a in ("-p", p)], "--shards", "8",
                "--out", f"{out}/{name}", "--no-progress", *args]
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        return read_doc(f"{out}/{name}")

    found = {
        "default": go("default"),
        "half": cli("half", "--gpus-per-shard", "0.5"),
        "cuda": go("cuda", device="cuda"),
        "too_many": go("too_many", gpus_per_shard=3),
        "node_max": go("node_max", gpus_per_shard=1.5),
        "heat_default": go("heat", job="heat", params=["N=6"]),
        "heat_gpu": go("heat_gpu", job="heat", params=["N=6"], gpus_per_shard=1),
        "cuda_no_gpu": go("cuda0", device="cuda", gpus_per_shard=0),
    }
    print("RESULT " + json.dumps(found))
"""


@pytest.fixture(scope="module")
def fake_gpu_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("gpu")
    code = textwrap.dedent(_SCRIPT).replace("SMALL", repr(SMALL))
    done = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_default_one_gpu_per_shard_spread_over_both_ids(fake_gpu_runs: dict) -> None:
    man = fake_gpu_runs["default"]
    assert man["status"] == "complete"
    assert man["options"]["gpus_per_shard"] == 1.0  # the cluster has GPUs: default 1
    shards = man["shards"]
    assert len(shards) == 8
    assert {tuple(s["gpu_ids"]) for s in shards} == {("0",), ("1",)}
    assert {s["device"] for s in shards} == {"cpu"}  # torch sees no GPU: CPU fallback
    # max_calls=0: worker processes are reused across shards (GPU tasks included)
    assert len({s["pid"] for s in shards}) < len(shards)


def test_fractional_gpus(fake_gpu_runs: dict) -> None:
    man = fake_gpu_runs["half"]
    assert man["status"] == "complete"
    assert man["options"]["gpus_per_shard"] == 0.5
    assert all(len(s["gpu_ids"]) == 1 for s in man["shards"])
    assert {s["device"] for s in man["shards"]} == {"cpu"}


def test_job_without_device_parameter_gets_no_gpu(fake_gpu_runs: dict) -> None:
    man = fake_gpu_runs["heat_default"]
    assert man["status"] == "complete" and man["options"]["gpus_per_shard"] == 0.0
    assert "has no `device` parameter" in fake_gpu_runs["heat_gpu"]["error"]


@pytest.mark.parametrize(
    ("run", "match"),
    [
        ("cuda", "--device cuda: torch sees no CUDA device"),
        ("too_many", "--gpus-per-shard 3: the cluster has 2 GPUs"),
        ("node_max", "fractions of one GPU"),
        ("cuda_no_gpu", "--device cuda with --gpus-per-shard 0"),
    ],
)
def test_gpu_errors_are_one_line(fake_gpu_runs: dict, run: str, match: str) -> None:
    error = fake_gpu_runs[run]["error"]
    assert match in error and "\n" not in error


# ---------------------------------------------------------------------------
# The worker's choice, without Ray
# ---------------------------------------------------------------------------


def test_device_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "_CUDA_VIEW", None)
    monkeypatch.setattr(worker.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(worker, "_ray_gpus", lambda: (True, []))
    assert worker._device("auto") == "cpu"  # a Ray task without a GPU stays on the CPU
    with pytest.raises(JacpipeError, match="Ray gave this task no GPU"):
        worker._device("cuda")
    monkeypatch.setattr(worker, "_ray_gpus", lambda: (True, ["1"]))
    assert worker._device("auto") == "cuda"
    assert worker._device("cpu") == "cpu"
    monkeypatch.setattr(worker, "_ray_gpus", lambda: (False, []))
    assert worker._device("auto") == "cuda"  # outside Ray: whatever torch sees
    monkeypatch.setattr(worker.torch.cuda, "is_available", lambda: False)
    assert worker._device("auto") == "cpu"


def test_gpu_ids_record_the_gpu_torch_really_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reused worker given GPU 1 after torch opened GPU 0 computes on 0: say so."""
    monkeypatch.setattr(worker, "_ray_gpus", lambda: (True, ["1"]))
    monkeypatch.setattr(worker, "_CUDA_VIEW", None)
    assert worker._gpu_ids() == ["1"]
    monkeypatch.setattr(worker, "_CUDA_VIEW", "0")
    monkeypatch.setattr(worker.torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(worker.torch.cuda, "current_device", lambda: 0)
    assert worker._gpu_ids() == ["0"]
    monkeypatch.setattr(worker, "_CUDA_VIEW", "0,1")  # torch sees both: Ray's id holds
    assert worker._gpu_ids() == ["1"]
