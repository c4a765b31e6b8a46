"""``pipeline.core.imports``: a backward without sympy, the real module where it is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

_FRESH = r"""
import json, sys
import torch
from pipeline.core.imports import spare_sympy_import
installed = spare_sympy_import()
x = torch.randn(7, dtype=torch.float64, requires_grad=True)
u = torch.randn(7, dtype=torch.float64)
(g,) = torch.autograd.grad(torch.sin(x) * x, x, u)
# the reference --verify computes: one autograd.grad per row, each given its grad_outputs
jac = torch.autograd.functional.jacobian(lambda t: t.tanh() * t.sum(), x.detach())
t = x.detach()
ref = torch.diag(1 - t.tanh() ** 2) * t.sum() + t.tanh()[:, None]
before = "sympy" in sys.modules
try:
    torch.autograd.grad((x * 2).sum(), x, torch.ones(3))  # a wrong shape: torch's own error
    shape_error = None
except RuntimeError as exc:
    shape_error = str(exc).splitlines()[0]
import torch.fx.experimental.symbolic_shapes as ss
from torch.fx.experimental.symbolic_shapes import ShapeEnv, guard_bool
real = sys.modules["torch.fx.experimental.symbolic_shapes"]
print(json.dumps({
    "installed": installed, "again": spare_sympy_import(),
    "grad": float((g - (torch.cos(x) * x + torch.sin(x)).detach() * u).abs().max()),
    "jac": float((jac - ref).abs().max()), "sympy_before": before,
    "shape_error": shape_error,
    "real": type(real).__name__ == "module" and ss.ShapeEnv is ShapeEnv is real.ShapeEnv,
    "parent": torch.fx.experimental.symbolic_shapes is real,
    "guard_bool": guard_bool(True), "sympy_after": "sympy" in sys.modules,
}))
"""


def test_a_backward_needs_no_sympy_and_the_real_module_comes_when_asked():
    """NOTE: [backward without sympy] in a fresh interpreter (the import happens once)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", _FRESH], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["installed"] is True and doc["again"] is False
    assert doc["grad"] < 1e-12 and doc["jac"] < 1e-12
    assert doc["sympy_before"] is False  # the gradients above never imported it
    assert doc["shape_error"] is not None and "Mismatch in shape" in doc["shape_error"]
    assert doc["real"] and doc["parent"] and doc["guard_bool"] is True
    assert doc["sympy_after"] is True
