"""Soak benchmark: many small shards, worker kills, one driver SIGKILL, resume; nothing lost.

    python -m benchmarks.soak [--shards 200] [--kill-fraction 0.1] [--seed 0] [--json PATH]

What it does, with the test-only job ``tests.faultjobs:crashy`` (a seeded MLP
whose backward pass SIGKILLs its own Ray worker, on the first attempt only, for
a seeded random choice of shards):

1. ``jacpipe run`` in a subprocess with its own embedded Ray, in its own
   session; once a third of the shards are committed, SIGKILL the driver's
   whole process group and reap every process of that session that is left.
2. Resume: run the same job on the same folder (in this process); it must
   compute exactly the shards that were not committed.
3. A clean run (no kills) of the same plan and chunking.
4. Count: rows lost and rows duplicated (from the ``row`` column of the
   committed part files, read with pyarrow), values equal to the clean run's
   (bitwise), worker kills survived, leftover temp files and processes.

Prints one line per fact and writes JSON to ``benchmarks/results/soak.json``.
``tests/runner/test_driver.py`` runs a 24-shard version.

    python -m benchmarks.soak --commits 2000 20000 [--run-seconds-per-shard S]

measures the driver's side of committing alone, without Ray (see
:func:`commit_cost`): N ``ResultFolder.commit`` calls plus ``finish`` (the
commit log), against a full manifest rewrite per commit (before the log),
and writes ``benchmarks/results/soak_commits.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil

JOB = "tests.faultjobs:crashy"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "soak.json"
COMMIT_RESULTS = ROOT / "benchmarks" / "results" / "soak_commits.json"
#: Full manifest rewrites timed exactly up to this many shards; beyond it a
#: sample of rewrites at evenly spaced manifest sizes is timed and scaled
#: (a rewrite's cost is linear in the entries, so the sample mean is the mean).
OLD_EXACT_MAX = 500
OLD_SAMPLES = 60
#: Wall seconds per shard of a small-Jacobian run: ``--ray-run 2000`` (mlp,
#: n=20, 2 rows a shard, embedded Ray with 2 CPUs) took 40.1 s on 2 shared cores.
RUN_SECONDS_PER_SHARD = 0.020


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes of session ``sid`` (a driver started with ``start_new_session``).

    Ray workers move into their own process groups but stay in the session,
    so the session finds them all, and never the caller's own Ray.
    """
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != sid and os.getsid(proc.pid) == sid and (
                proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def kill_session(
    proc: subprocess.Popen, *, sig: int = signal.SIGKILL, timeout: float = 60.0,
    grace: float = 10.0,
) -> int:
    """Send ``sig`` to ``proc``'s process group, then SIGKILL whatever of its session is left.

    Args:
        proc: a process started with ``start_new_session=True``.
        sig: the signal for the group (SIGKILL: a crash; SIGINT: a Ctrl-C).
        timeout: seconds to wait for ``proc`` itself to exit (then SIGKILL).
        grace: seconds its other processes get to exit on their own.

    Returns:
        How many processes of the session outlived the signal and had to be
        killed one by one (0 when Ray's fate sharing took them down).
    """
    sid = proc.pid
    try:
        tree = psutil.Process(sid).children(recursive=True)
    except psutil.Error:
        tree = []
    try:
        os.killpg(sid, sig)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + grace
    left: list[psutil.Process] = []
    while time.monotonic() < deadline:
        by_pid = {p.pid: p for p in session_processes(sid)}
        by_pid.update({p.pid: p for p in tree if _alive(p)})
        left = list(by_pid.values())
        if not left:
            return 0
        time.sleep(0.2)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    return len(left)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


# ---------------------------------------------------------------------------
# Result folders
# ---------------------------------------------------------------------------


def read_manifest(out: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The folder's manifest with its commit log merged, or ``None`` before the driver wrote one.

    Read by hand (pyarrow and JSON, no jacpipe): the manifest document in
    ``_manifest.parquet``'s schema metadata, then each complete line of
    ``_commits.jsonl`` (a later commit of a shard wins).
    """
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(Path(out) / "_manifest.parquet").metadata
        man = json.loads(meta[b"jacpipe.manifest"])
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    shards = {s["index"]: s for s in man["shards"]}
    try:
        lines = (Path(out) / "_commits.jsonl").read_text().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line: not committed
        shards[entry["index"]] = entry
    man["shards"] = [shards[i] for i in sorted(shards)]
    return man


def wait_for_commits(
    out: str | os.PathLike[str], k: int, proc: subprocess.Popen, *, timeout: float = 300.0
) -> int:
    """Poll the manifest until at least ``k`` shards are committed; return how many.

    Raises:
        RuntimeError: the driver exited first, or ``timeout`` passed.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        man = read_manifest(out)
        if man is not None and len(man["shards"]) >= k:
            return len(man["shards"])
        if proc.poll() is not None:
            raise RuntimeError(f"the driver exited ({proc.returncode}) before {k} commits")
        time.sleep(0.05)
    raise RuntimeError(f"fewer than {k} shards committed after {timeout:.0f}s")


def committed_rows(out: str | os.PathLike[str]) -> np.ndarray:
    """The ``row`` column of every committed part file, concatenated (pyarrow, no jacpipe)."""
    import pyarrow.parquet as pq

    man = read_manifest(out) or {"shards": []}
    parts = [
        pq.read_table(Path(out) / s["file"], columns=["row"]).column("row").to_numpy()
        for s in man["shards"]
    ]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def row_accounting(out: str | os.PathLike[str], total: int) -> tuple[int, int]:
    """``(rows lost, rows duplicated)`` over the committed part files of ``out``."""
    rows = committed_rows(out)
    unique = np.unique(rows)
    inside = unique[(unique >= 0) & (unique < total)]
    return total - len(inside), len(rows) - len(unique)


# ---------------------------------------------------------------------------
# The soak
# ---------------------------------------------------------------------------


def job_params(
    *, rows: int, markers: str, kill: list[int] | None = None, delay: float = 0.0
) -> list[str]:
    """``-p`` pairs of the crashy job for a soak of ``rows`` rows."""
    params = ["n=40", f"m={rows}", "hidden=8", f"markers={markers}", f"delay={delay}"]
    if kill:
        params.append("kill=" + ",".join(map(str, kill)))
    return params


def soak(
    *,
    shards: int = 200,
    kill_fraction: float = 0.1,
    seed: int = 0,
    workdir: str | os.PathLike[str] | None = None,
    num_cpus: int = 2,
    delay: float = 0.05,
    kill_driver_after: int | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the soak (see the module docstring) and return its report.

    Args:
        shards: shards of two rows each (so each shard has two chunks).
        kill_fraction: share of shards whose first attempt kills its worker.
        seed: seed of the choice of those shards.
        workdir: where the result folders go (a temp folder by default).
        num_cpus: CPUs of the killed driver's embedded Ray.
        delay: seconds per chunk, so the driver is killed mid-run.
        kill_driver_after: SIGKILL the driver once this many shards are
            committed (a third of them by default).
        echo: where progress lines go.

    Returns:
        The facts printed by :func:`main`; ``ok`` is True when nothing was
        lost or duplicated and the values equal the clean run's.
    """
    from pipeline import RunOptions, read_jacobian, run
    from pipeline.store.folder import is_leftover

    work = Path(workdir or tempfile.mkdtemp(prefix="jacpipe-soak-"))
    out, clean = work / "soak", work / "clean"
    markers, clean_markers = work / "markers", work / "clean-markers"
    for d in (markers, clean_markers):
        d.mkdir(parents=True, exist_ok=True)
    rows = 2 * shards
    kill = sorted(random.Random(seed).sample(range(shards), round(kill_fraction * shards)))
    after = kill_driver_after if kill_driver_after is not None else max(1, shards // 3)
    params = job_params(rows=rows, markers=str(markers), kill=kill, delay=delay)
    common = ["--shards", str(shards), "--chunk-size", "1", "--method", "rev"]

    # 1. A driver with its own embedded Ray, SIGKILLed mid-run.
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pipeline.cli", "run", JOB, "--out", str(out),
           "--num-cpus", str(num_cpus), "--no-progress", *common]
    for p in params:
        cmd += ["-p", p]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(work / "driver.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for_commits(out, after, proc)
        finally:
            leftover_processes = kill_session(proc)
    alive_after_kill = len(session_processes(proc.pid))
    killed_manifest = read_manifest(out) or {"shards": [], "run_id": None}
    committed_at_kill = len(killed_manifest["shards"])
    echo(f"driver SIGKILLed with {committed_at_kill}/{shards} shards committed "
         f"({leftover_processes} Ray processes outlived it and were reaped)")

    # 2. Resume in this process (an existing Ray, or a new embedded one).
    t1 = time.perf_counter()
    opts = dict(shards=shards, chunk_size=1, method="rev", num_cpus=num_cpus, progress=False)
    summary = run(RunOptions(job=JOB, params=params, out=str(out), **opts), echo=lambda s: None)
    t2 = time.perf_counter()
    echo(f"resumed: {summary.computed} computed, {summary.skipped} resumed")

    # 3. A clean run of the same plan and chunking.
    run(RunOptions(job=JOB, params=job_params(rows=rows, markers=str(clean_markers)),
                   out=str(clean), **opts), echo=lambda s: None)

    # 4. The accounting.
    final = read_manifest(out) or {"shards": []}
    lost, duplicated = row_accounting(out, rows)
    equal = bool(np.array_equal(read_jacobian(out), read_jacobian(clean)))
    worker_kills = sum(1 for name in os.listdir(markers) if name.startswith("killed-"))
    report = {
        "shards": shards,
        "rows": rows,
        "worker_kills_planned": len(kill),
        "worker_kills": worker_kills,
        "driver_kills": 1,
        "kills_survived": worker_kills + 1,
        "committed_at_driver_kill": committed_at_kill,
        "computed_on_resume": summary.computed,
        "resumed": summary.skipped,
        "computed_by_resume_run_id": sum(
            1 for s in final["shards"] if s.get("run_id") == final.get("run_id")
        ),
        "shards_retried_after_worker_death": sum(
            1 for s in final["shards"] if s.get("attempt", 1) > 1
        ),
        "rows_lost": lost,
        "rows_duplicated": duplicated,
        "values_equal_clean_run": equal,
        "leftover_temp_files": sorted(n for n in os.listdir(out) if is_leftover(n)),
        "leftover_ray_processes_reaped": leftover_processes,
        "ray_processes_alive_after_kill": alive_after_kill,
        "status": final.get("status"),
        "seconds_until_driver_kill": round(t1 - t0, 2),
        "seconds_resume": round(t2 - t1, 2),
        "seed": seed,
        "out": str(out),
    }
    report["ok"] = bool(
        lost == 0
        and duplicated == 0
        and equal
        and summary.computed == shards - committed_at_kill
        and report["computed_by_resume_run_id"] == summary.computed
        and worker_kills == len(kill)
        and not report["leftover_temp_files"]
        and alive_after_kill == 0
        and report["status"] == "complete"
    )
    return report


# ---------------------------------------------------------------------------
# The driver's commit cost (no Ray)
# ---------------------------------------------------------------------------


def _commit_fixture(shards: int, root: Path) -> tuple[Any, list[Any]]:
    """A prepared :class:`ResultFolder` of a ``shards``-shard plan and its shard entries."""
    from pipeline.core import Shapes, ShardResult
    from pipeline.store import Manifest, ResultFolder, Storage, part_name

    rows_per = 2
    manifest = Manifest(
        job="mlp", params={"n": 20, "m": 2 * shards}, fingerprint={}, method="rev",
        layout="dense", plan=[(i * rows_per, (i + 1) * rows_per) for i in range(shards)],
        shapes=Shapes("jacobian", (20,), (rows_per * shards,), None, "float32"), run_id="bench",
    )
    folder = ResultFolder(Storage(str(root)))
    folder.prepare(manifest, resume=False, overwrite=True)
    entries = [
        ShardResult(i, a, b, part_name(i), b - a, f"{i:064x}", 1234, seconds=0.5,
                    compute_seconds=0.4, write_seconds=0.01, node_id="n" * 56, device="cpu",
                    chunk_size=2, peak_rss=400_000_000, pid=1234, run_id="bench")
        for i, (a, b) in enumerate(manifest.plan)
    ]
    return folder, entries


def commit_cost(shards: int, workdir: Path) -> dict[str, Any]:
    """Driver seconds spent committing ``shards`` shards: the log vs a rewrite per commit.

    ``log_seconds``: ``shards`` ``ResultFolder.commit`` calls (one fsynced
    line each) plus ``finish("complete")`` (one manifest rewrite). Measured
    exactly. ``rewrite_seconds``: ``Manifest.write`` after every commit, as
    before the log; exact up to :data:`OLD_EXACT_MAX` shards, else
    :data:`OLD_SAMPLES` rewrites at evenly spaced sizes, scaled to ``shards``.
    """
    from pipeline.store import Storage

    folder, entries = _commit_fixture(shards, workdir / f"log-{shards}")
    t0 = time.perf_counter()
    for entry in entries:
        folder.commit(entry)
    folder.finish("complete")
    log_seconds = time.perf_counter() - t0

    folder, entries = _commit_fixture(shards, workdir / f"rewrite-{shards}")
    manifest, storage = folder.manifest, Storage(str(workdir / f"rewrite-{shards}"))
    exact = shards <= OLD_EXACT_MAX
    timed = set(range(shards)) if exact else {
        int(k) for k in np.linspace(0, shards - 1, OLD_SAMPLES)}
    spent = 0.0
    for i, entry in enumerate(entries):
        manifest.commit(entry)
        if i in timed:
            t0 = time.perf_counter()
            manifest.write(storage)
            spent += time.perf_counter() - t0
    rewrite_seconds = spent if exact else spent / len(timed) * shards
    folder.unlock()
    return {
        "shards": shards,
        "log_seconds": round(log_seconds, 3),
        "log_ms_per_commit": round(1000 * log_seconds / shards, 3),
        "rewrite_seconds": round(rewrite_seconds, 2),
        "rewrite_measured": "exact" if exact else f"{len(timed)} rewrites sampled, scaled",
        "speedup": round(rewrite_seconds / log_seconds, 1),
        "manifest_bytes": (workdir / f"log-{shards}" / "_manifest.parquet").stat().st_size,
    }


def ray_commit_share(shards: int, num_cpus: int) -> dict[str, Any]:
    """A real ``mlp`` run of ``shards`` 2-row shards: its wall time and the driver's commit time."""
    import ray

    from pipeline import RunOptions
    from pipeline.runner import driver as runner
    from pipeline.store import ResultFolder

    spent = [0.0]
    real = ResultFolder.commit

    def timed(self: Any, result: Any) -> None:
        t0 = time.perf_counter()
        real(self, result)
        spent[0] += time.perf_counter() - t0

    ResultFolder.commit = timed  # type: ignore[method-assign]
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory(prefix="jacpipe-commits-") as tmp:
            t0 = time.perf_counter()
            runner.run(RunOptions(job="mlp", params=["n=20", f"m={2 * shards}", "hidden=8"],
                                  shards=shards, out=f"{tmp}/out", progress=False),
                       echo=lambda _: None)
            wall = time.perf_counter() - t0
    finally:
        ResultFolder.commit = real  # type: ignore[method-assign]
        ray.shutdown()
    return {"shards": shards, "wall_seconds": round(wall, 1),
            "commit_seconds": round(spent[0], 2),
            "commit_percent_of_run": round(100 * spent[0] / wall, 2)}


def commits_main(
    sizes: list[int], seconds_per_shard: float, path: Path, ray_run: int | None = None
) -> int:
    """``--commits``: measure :func:`commit_cost` at each size, print a table, write JSON."""
    sys.path.insert(0, str(ROOT))
    rows = []
    with tempfile.TemporaryDirectory(prefix="jacpipe-commits-") as tmp:
        for shards in sizes:
            row = commit_cost(shards, Path(tmp))
            run = seconds_per_shard * shards
            row["run_seconds_estimate"] = round(run, 1)
            row["log_percent_of_run"] = round(100 * row["log_seconds"] / run, 2)
            row["rewrite_percent_of_run"] = round(100 * row["rewrite_seconds"] / run, 1)
            rows.append(row)
            print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    report = {
        "what": "driver seconds committing N shards, no Ray: commit log vs manifest "
                "rewrite per commit",
        "run_seconds_per_shard": seconds_per_shard,
        "ok": all(r["log_percent_of_run"] < 2.0 for r in rows),
        "sizes": rows,
    }
    if ray_run:
        report["ray_run"] = ray_commit_share(ray_run, num_cpus=2)
        print("ray run: " + "  ".join(f"{k}={v}" for k, v in report["ray_run"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 when the soak holds."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--kill-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds per chunk")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="where to write the report")
    parser.add_argument("--commits", type=int, nargs="+", default=None, metavar="N",
                        help="only time the driver's commits of N shards (no Ray)")
    parser.add_argument("--run-seconds-per-shard", type=float, default=RUN_SECONDS_PER_SHARD,
                        help="wall seconds per shard of the run the commits are compared to")
    parser.add_argument("--ray-run", type=int, default=None, metavar="SHARDS",
                        help="with --commits: also time the commits of a real run")
    args = parser.parse_args(argv)
    if args.commits:
        return commits_main(args.commits, args.run_seconds_per_shard,
                            Path(args.json or COMMIT_RESULTS), args.ray_run)
    if args.shards < 3:
        parser.error("--shards must be at least 3")
    os.chdir(ROOT)  # Ray puts the driver's cwd on its workers' path: tests.faultjobs
    sys.path.insert(0, str(ROOT))
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, logging_level="ERROR")
    try:
        report = soak(shards=args.shards, kill_fraction=args.kill_fraction, seed=args.seed,
                      workdir=args.workdir, num_cpus=args.num_cpus, delay=args.delay)
    finally:
        if started:
            ray.shutdown()
    for key in ("shards", "worker_kills", "driver_kills", "kills_survived",
                "committed_at_driver_kill", "computed_on_resume", "resumed", "rows_lost",
                "rows_duplicated", "values_equal_clean_run", "leftover_temp_files",
                "leftover_ray_processes_reaped", "ray_processes_alive_after_kill", "ok"):
        print(f"{key:32s} {report[key]}")
    path = Path(args.json or RESULTS)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
