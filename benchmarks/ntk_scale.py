"""The eNTK of a small CNN at scale: the trace kernel of N CIFAR-shaped samples, memory-bounded.

``pipeline.write_ntk(net, x, kernel="trace", memory_budget=..., executor="ray")``:
rows of ``K`` (N x N, float32) written as a result folder by Ray tasks, one per
block of samples, on an embedded Ray of ``--num-cpus`` CPUs (one torch thread
per task). The network: Conv2d(3, 8, 3, stride 2) - ReLU - Conv2d(8, 16, 3,
stride 2) - ReLU - Linear(1024, 10), random weights, 32 x 32 x 3 inputs
(P = 11,642, O = 10).

Every process's peak resident memory is measured two ways: each shard
reports its process's ``ru_maxrss`` (the manifest's ``peak_rss``, by ``pid``),
and a thread here samples the resident set of this process and of all its
descendants (Ray's daemons and workers) every 0.2 s. The target: every
process at most 1.2 GiB under ``--memory-budget 1GiB``. Two rows of ``K``
are checked against ``pipeline.ntk`` computed directly.

    python -m benchmarks.ntk_scale --n 2000                 # ~5 minutes on 2 cores
    python -m benchmarks.ntk_scale --n 10000                # the issue's size
    python -m benchmarks.ntk_scale --n 1000 --stored        # and K from stored J (ntk_from)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import pipeline

ROOT = Path(__file__).resolve().parent.parent
LIMIT = int(1.2 * 2**30)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(16 * 8 * 8, 10)).eval()


class Sampler(threading.Thread):
    """The peak resident set of this process and every descendant, by pid, sampled."""

    def __init__(self, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.period = period
        self.peaks: dict[int, dict] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.stop.is_set():
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    name = " ".join(proc.cmdline()[:1]) or proc.name()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                seen = self.peaks.setdefault(proc.pid, {"name": name, "rss": 0})
                seen["rss"] = max(seen["rss"], rss)
            self.stop.wait(self.period)


def from_stored(net: nn.Module, x: torch.Tensor, direct: str, args: argparse.Namespace
                ) -> dict:
    """``J`` written by ``pipeline.run`` (Ray tasks), then ``K`` by ``pipeline.ntk_from``."""
    jdir, kdir = tempfile.mkdtemp(prefix="ntk-scale-J-"), tempfile.mkdtemp(prefix="ntk-scale-K-")
    try:
        t0 = time.perf_counter()
        pipeline.run(pipeline.Problem.from_module(net, x), out=jdir, overwrite=True,
                     memory_budget=args.memory_budget, executor="ray", progress=False,
                     echo=lambda _: None)
        t1 = time.perf_counter()
        sampler = Sampler()  # this process only, from here on
        sampler.start()
        pipeline.ntk_from(jdir, kernel="trace", model=net, memory_budget=args.memory_budget,
                          out=kdir, overwrite=True)
        t2 = time.perf_counter()
        sampler.stop.set()
        sampler.join()
        k, ref = pipeline.read_jacobian(kdir), pipeline.read_jacobian(direct)
        jac = pipeline.open_jacobian(jdir)
        return {"jacobian_seconds": round(t1 - t0, 2), "ntk_from_seconds": round(t2 - t1, 2),
                "jacobian_stored_mib": round(sum(e.bytes for e in jac.committed) / 2**20, 1),
                "ntk_from_peak_rss_mib": round(sampler.peaks[os.getpid()]["rss"] / 2**20, 1),
                "vs_write_ntk_rel": float(np.abs(k - ref).max() / np.abs(ref).max())}
    finally:
        shutil.rmtree(jdir, ignore_errors=True)
        shutil.rmtree(kdir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--memory-budget", default="1GiB")
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--samples-per-shard", type=int, default=None)
    ap.add_argument("--out", default=None, help="the result folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/ntk-scale-N.json")
    ap.add_argument("--stored", action="store_true",
                    help="also: J stored by pipeline.run, then K from it by pipeline.ntk_from")
    args = ap.parse_args()

    net = small_cnn()
    x = torch.randn(args.n, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = args.out or tempfile.mkdtemp(prefix="ntk-scale-")
    load0 = os.getloadavg()
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    manifest = pipeline.write_ntk(net, x, out=out, kernel="trace", executor="ray",
                                  memory_budget=args.memory_budget, num_cpus=args.num_cpus,
                                  samples_per_shard=args.samples_per_shard, overwrite=True)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    driver_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    load1 = os.getloadavg()

    result = pipeline.open_jacobian(out)
    entries = result.committed
    workers: dict[int, int] = {}
    for e in entries:
        workers[e.pid] = max(workers.get(e.pid, 0), e.peak_rss or 0)
    check = [0, args.n - 1]
    got = pipeline.read_jacobian(out, rows=check)
    ref = pipeline.ntk(net, x[check], x, kernel="trace").numpy()
    rel = float(np.abs(got - ref).max() / np.abs(ref).max())
    sym = float(abs(got[0, -1] - got[1, 0]) / abs(ref).max())
    sampled = sorted(sampler.peaks.items(), key=lambda kv: -kv[1]["rss"])
    all_peak = max([driver_peak, *workers.values(), *(v["rss"] for _, v in sampled)])
    facts = manifest.fingerprint["ntk"]
    report = {
        "n": args.n, "kernel": "trace", "parameters": int(sum(p.numel() for p in net.parameters())),
        "outputs": 10, "method": facts["method"], "executor": facts["executor"],
        "memory_budget": args.memory_budget, "num_cpus": args.num_cpus,
        "shards": len(entries), "wall_seconds": round(wall, 2),
        "shard_seconds": [e.seconds for e in entries],
        "samples_per_block": sorted({e.chunk_size for e in entries}),
        "driver_peak_rss_mib": round(driver_peak / 2**20, 1),
        "shard_peak_rss_mib_by_pid": {str(k): round(v / 2**20, 1) for k, v in workers.items()},
        "sampled_peak_rss_mib": [{"pid": pid, "name": v["name"][:60],
                                  "rss_mib": round(v["rss"] / 2**20, 1)} for pid, v in sampled],
        "max_process_peak_rss_mib": round(all_peak / 2**20, 1),
        "target_every_process_le_1_2_gib": all_peak <= LIMIT,
        "k_stored_mib": round(sum(e.bytes for e in entries) / 2**20, 1),
        "rows_checked_vs_direct_ntk_rel": rel, "symmetry_rel": sym,
        "load_average_before_after": [load0, load1],
        "torch": torch.__version__,
    }
    if args.stored:
        report["stored"] = from_stored(net, x, out, args)
    print(json.dumps({k: v for k, v in report.items() if k != "sampled_peak_rss_mib"},
                     indent=1))
    print("top sampled processes:", report["sampled_peak_rss_mib"][:6])
    path = Path(args.json or ROOT / "benchmarks" / "results" / f"ntk-scale-{args.n}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    pipeline.shutdown()
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
