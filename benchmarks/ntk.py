"""The empirical NTK: pipeline.ntk against the torch.func tutorial's two recipes, side by side.

Float32, 2 torch threads, random weights, batch norm in eval mode.

(a) 3 x Dense(W) ReLU on 3,072-dimensional inputs, O = 8 outputs, N samples:
    ``pipeline.ntk(net, x)`` (the path its cost estimate chooses) against the
    tutorial's ``empirical_ntk_jacobian_contraction`` and
    ``empirical_ntk_ntk_vp`` (https://pytorch.org/tutorials/intermediate/neural_tangent_kernels.html),
    both called as ``(x, x)``; the NTK-VP recipe one ``x1`` sample at a time
    (vmapped over every pair, as written, it allocates 24 GiB here). The
    issue's size is W = 2,048 and N = 16; the tutorial's contraction then
    holds two 16 x 8 x 14.7M float32 Jacobians (15 GB) on this shared 23 GB
    machine, so the default is W = 1,024 (``--width 2048`` for the issue's size).
(b) a ResNet-18-shaped network written here (CIFAR stem: a 3x3 convolution,
    four stages of two basic blocks, widths ``c, 2c, 4c, 8c``, average pool,
    Linear to 10 classes) on 32 x 32 inputs; ``c = 64`` is ResNet-18
    (11M parameters). Default ``c = 16`` and N = 8 on this 2-core machine
    (``--resnet-width 64 --resnet-n 16`` for the full size).
(c) ``pipeline.sketch`` with k = 2,048 (Rademacher) on (b) under a memory
    budget of one forward + backward of the batch (``out.sum().backward()``):
    its peak memory against that forward + backward's.

Times are interleaved rounds in one process (medians, paired ratios); peak
memory is the growth of the peak resident set (``VmHWM`` reset right before
the call) of a fresh process per method, the same set-up before each
(a forward + backward and a small sketch), with glibc's mmap threshold at 16 KiB
(``MMAP_THRESHOLD``) so that freed tensors leave the resident set.

    python -m benchmarks.ntk             # ~5 minutes on 2 loaded cores
    python -m benchmarks.ntk --quick     # ~30 seconds, small sizes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from benchmarks.harness import Report, Target, interleaved, median, paired_speed, parser

ROOT = Path(__file__).resolve().parent.parent
#: glibc serves allocations from this size by mmap and returns them on free, so a
#: process's resident set follows its live tensors (16 KiB: every tensor of (b) and
#: (c)); larger, freed heap chunks stay resident and are reused unseen by a later call.
MMAP_THRESHOLD = 16384


def dense_net(width: int, outputs: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3072, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, outputs)).eval()


class Block(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norm, and the shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.short(x))


def resnet18(c: int = 64, classes: int = 10) -> nn.Module:
    """ResNet-18's shape for 32 x 32 inputs (the CIFAR stem), random weights, eval mode."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c),
                               nn.ReLU()]
    cin = c
    for i, cout in enumerate((c, 2 * c, 4 * c, 8 * c)):
        layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    net = nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return net.eval()


def tutorial(net: nn.Module):
    """The tutorial's two recipes for ``net``: ``(x1, x2) -> (N1, N2, O, O)``."""
    params = {k: v.detach() for k, v in net.named_parameters()}

    def single(p, x):
        return functional_call(net, p, (x.unsqueeze(0),)).squeeze(0)

    def contraction(x1, x2):
        jac1 = [j.flatten(2) for j in vmap(jacrev(single), (None, 0))(params, x1).values()]
        jac2 = [j.flatten(2) for j in vmap(jacrev(single), (None, 0))(params, x2).values()]
        return torch.stack([torch.einsum("Naf,Mbf->NMab", a, b)
                            for a, b in zip(jac1, jac2, strict=True)]).sum(0)

    def ntk_vp(x1, x2):
        def get_ntk(a, b):
            out, vjp_fn = vjp(lambda p: single(p, a), params)

            def get_slice(vec):
                vjps = vjp_fn(vec)
                return jvp(lambda p: single(p, b), (params,), vjps)[1]

            basis = torch.eye(out.numel(), dtype=out.dtype).view(out.numel(), -1)
            return vmap(get_slice)(basis)

        # NOTE: the tutorial vmaps over x1 too; that holds N1 N2 O vectors of P
        # floats at once (24 GiB for (a) at W = 1,024): one x1 sample at a time here.
        return torch.stack([vmap(get_ntk, (None, 0))(a, x2) for a in x1])

    return contraction, ntk_vp


def cases(args: argparse.Namespace) -> dict[str, tuple[nn.Module, torch.Tensor]]:
    gen = torch.Generator().manual_seed(2)
    return {
        "dense": (dense_net(args.width), torch.randn(args.n, 3072, generator=gen)),
        "resnet": (resnet18(args.resnet_width),
                   torch.randn(args.resnet_n, 3, 32, 32, generator=gen)),
    }


def methods(net: nn.Module, x: torch.Tensor) -> dict[str, object]:
    import pipeline

    contraction, ntk_vp = tutorial(net)
    return {
        "jacpipe": lambda: pipeline.ntk(net, x),
        "tutorial contraction": lambda: contraction(x, x),
        "tutorial ntk-vp": lambda: ntk_vp(x, x),
    }


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    """One method once in this fresh process: print its peak RSS growth (JSON)."""
    import psutil

    import pipeline

    torch.set_num_threads(2)
    case, method = args.child.split(":", 1)
    net, x = cases(args)[case]
    if method == "forward+backward":
        def run():
            net.zero_grad()
            net(x).sum().backward()
    elif method == "sketch":
        def run():
            return pipeline.sketch(net, x, args.k, memory_budget=args.sketch_budget,
                                   distribution="rademacher")
    else:
        run = methods(net, x)[method]
    # torch.func's and autograd's one-time set-up (~70 MiB), the gradients' buffers:
    # outside the measurement, as in any process that has done one step before
    net.zero_grad()
    net(x[:1]).sum().backward()
    pipeline.sketch(net, x[:1], 2)
    base = psutil.Process().memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak": _vm_hwm() - base, "seconds": seconds}))


def measure(args: argparse.Namespace, name: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "benchmarks.ntk", "--child", name, *_size_flags(args)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _size_flags(args: argparse.Namespace) -> list[str]:
    return ["--width", str(args.width), "--n", str(args.n), "--resnet-width",
            str(args.resnet_width), "--resnet-n", str(args.resnet_n), "--k", str(args.k),
            "--sketch-budget", str(args.sketch_budget)]


def compare(report: Report, args: argparse.Namespace, case: str, target: float) -> None:
    import pipeline

    net, x = cases(args)[case]
    p = sum(t.numel() for t in net.parameters())
    calls = methods(net, x)
    print(f"({case}) P = {p:,}: checking against the tutorial's contraction", flush=True)
    k, plan = pipeline.ntk(net, x, report=True)
    ref = calls["tutorial contraction"]()
    n, o = ref.shape[0], ref.shape[2]
    ref = ref.permute(0, 2, 1, 3).reshape(n * o, n * o)
    err = float((k - ref).abs().max() / ref.abs().max())
    del ref
    print(f"({case}) timing {args.repeats} interleaved rounds", flush=True)
    times = interleaved(calls, repeats=args.repeats, warmup=0)
    print(f"({case}) peak memory, a fresh process per method", flush=True)
    peaks = {m: measure(args, f"{case}:{m}")["peak"] for m in calls}
    rows = [[m, f"{median(t):.3f} s", paired_speed(times, "tutorial contraction", m),
             f"{peaks[m] / 2**20:.0f} MiB"] for m, t in times.items()]
    report.table(f"({case}) N = {n}, O = {o}, P = {p:,}: eNTK (N O x N O), float32; "
                 f"jacpipe chose {plan.method}", ["method", "median", "speed vs contraction",
                                                  "peak RSS growth"], rows)
    speed = paired_speed(times, "tutorial contraction", "jacpipe")
    report.target(Target(f"({case}) jacpipe ({plan.method}) vs Jacobian contraction", speed,
                         target, note=f"max rel error {err:.1e}"))
    report.facts[case] = {"n": n, "o": o, "p": p, "chosen": plan.method,
                          "estimates": plan.estimates, "layers": plan.layers,
                          "max_rel_error": err, "times": times, "peak_bytes": peaks}


def sketch_memory(report: Report, args: argparse.Namespace) -> None:
    fb = measure(args, "resnet:forward+backward")
    args.sketch_budget = int(fb["peak"])  # the budget: what one forward + backward takes
    sk = measure(args, "resnet:sketch")
    ratio = sk["peak"] / fb["peak"]
    report.table(f"(c) J Ω sketch, k = {args.k}, on (b): peak RSS growth",
                 ["call", "peak RSS growth", "seconds"],
                 [["one forward + backward of the batch", f"{fb['peak'] / 2**20:.0f} MiB",
                   fb["seconds"]], [f"sketch k = {args.k}", f"{sk['peak'] / 2**20:.0f} MiB",
                                    sk["seconds"]]])
    report.target(Target(f"sketch k = {args.k} peak / forward+backward peak", ratio, 2.0,
                         higher_is_better=False, unit="x"))
    report.facts["sketch"] = {"k": args.k, "forward_backward": fb, "sketch": sk,
                              "budget": args.sketch_budget}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--resnet-width", type=int, default=16)
    p.add_argument("--resnet-n", type=int, default=8)
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--sketch-budget", type=int, default=64 << 20, help=argparse.SUPPRESS)
    p.add_argument("--parts", default="dense,resnet,sketch", help="which of (a), (b), (c)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.width, args.n, args.resnet_width, args.resnet_n, args.k = 128, 4, 4, 2, 64
    args.repeats = max(args.repeats or 3, 1)  # ``--repeats 1``: one round (a loaded machine)
    if args.child:
        child(args)
        return
    torch.set_num_threads(2)
    report = Report("ntk", args.quick)
    report.facts["sizes"] = {k: v for k, v in vars(args).items() if k != "json"}
    parts = args.parts.split(",")
    if "dense" in parts:
        compare(report, args, "dense", 3.0)
    if "resnet" in parts:
        compare(report, args, "resnet", 2.0)
    if "sketch" in parts:
        sketch_memory(report, args)
    report.finish(args.json)


if __name__ == "__main__":
    main()
