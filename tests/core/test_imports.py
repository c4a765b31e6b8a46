"""``pipeline.core.imports``: a backward without sympy, the real module where it is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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


_FORWARD = r"""
import json, sys
import torch
from pipeline.maths.compiled import spare_dynamo_import  # what every eager pass calls first
spare_dynamo_import()
installed = type(sys.modules["torch.fx.experimental.symbolic_shapes"]).__name__ != "module"
x = torch.randn(6, dtype=torch.float64)
w = torch.randn(6, dtype=torch.float64)

def fn(u):  # constants beside dual tensors: zero-tangent (Meta-kernel) paths
    return 0.5 * u ** 3 / 3 + u * w - torch.where(u > 0, u, 2.0) + torch.tensor(1.5) * u

fwd = torch.func.jacfwd(fn)(x)
ref = torch.autograd.functional.jacobian(fn, x)
before = "sympy" in sys.modules
import torch._prims_common as utils
from torch.fx.experimental.symbolic_shapes import guard_or_false, sym_and
plain = [guard_or_false(True), guard_or_false(False), sym_and(True, False)]
try:
    guard_or_false(1)  # not a bool: the real helper's own error
    refused = None
except AssertionError as exc:
    refused = str(exc)
import sympy
kind = utils.ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT
_, sym_dtype = utils.elementwise_dtypes(sympy.Float(2.5), torch.ones(2, dtype=torch.int32),
                                        type_promotion_kind=kind)
_, int_dtype = utils.elementwise_dtypes(sympy.Integer(2), torch.ones(2, dtype=torch.int32),
                                        type_promotion_kind=kind)
fwd_after = torch.func.jacfwd(fn)(x)
print(json.dumps({
    "installed": installed, "err": float((fwd - ref).abs().max()), "sympy_before": before,
    "plain": plain, "refused": refused, "sym_dtype": str(sym_dtype), "int_dtype": str(int_dtype),
    "err_after": float((fwd_after - ref).abs().max()),
}))
"""


def test_forward_mode_with_constants_needs_no_sympy():
    """NOTE: [forward mode without sympy] in a fresh interpreter, then with sympy imported."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", _FORWARD], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["installed"] is True
    assert doc["err"] < 1e-12 and doc["err_after"] < 1e-12
    assert doc["sympy_before"] is False
    assert doc["plain"] == [True, False, False]
    assert doc["refused"] is not None and "Expected bool" in doc["refused"]
    # a sympy expression is promoted as torch promotes it, once sympy is there
    assert doc["sym_dtype"] == "torch.float32" and doc["int_dtype"] == "torch.int32"


_DECOMPOSITIONS = r"""
import json, sys
import torch
import torch.nn.functional as F
from pipeline.core.imports import spare_sympy_import
spare_sympy_import()
MOD = "torch._decomp.decompositions_for_jvp"
x = torch.randn(4, 5, dtype=torch.float64)
first = lambda t: torch.tanh(t) * t.sum() + torch.trace(t[:, :4]) + F.logsigmoid(t)
e1 = float((torch.func.jacfwd(first)(x) - torch.autograd.functional.jacobian(first, x)).abs().max())
loaded_first = MOD in sys.modules
g = torch.randn(4, 5, dtype=torch.float64)
scalar = lambda t: (F.log_softmax(t, -1) * g).sum() + F.layer_norm(t, (5,)).pow(2).sum()
hvp = torch.func.jvp(torch.func.grad(scalar), (x,), (g,))[1]
ref = (torch.autograd.functional.hessian(scalar, x).reshape(20, 20) @ g.reshape(-1)).reshape(4, 5)
print(json.dumps({"e1": e1, "loaded_first": loaded_first, "e2": float((hvp - ref).abs().max()),
                  "loaded_after": MOD in sys.modules,
                  "restored": torch.autograd.graph._engine_run_backward.__module__}))
"""


def test_forward_mode_defers_torchscript_decompositions_to_forward_over_reverse():
    """NOTE: [forward mode without TorchScript decompositions] in a fresh interpreter."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", _DECOMPOSITIONS], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    # first order (trace and logsigmoid included) and a plain backward: not loaded, right values
    assert doc["e1"] < 1e-12 and doc["loaded_first"] is False
    # forward over reverse through softmax and layer-norm backwards: loaded there, right values
    assert doc["e2"] < 1e-12 and doc["loaded_after"] is True
    assert doc["restored"] == "torch.autograd.graph"  # torch's own function back in place


_TWO_COMPILES = r"""
import json
import torch
from pipeline.core.imports import spare_sympy_import
spare_sympy_import()
from pipeline.maths.compiled import _compile
x, s = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

def hvp(scalar):
    return lambda x, s: torch.func.jvp(torch.func.grad(scalar), (x,), (s,))[1]

first, second = (lambda t: (t.sin() ** 2).sum()), (lambda t: (t.cos() * t).sum())
got = [_compile(hvp(first))(x, s)]
hvp(first)(x, s)  # eager forward over reverse: the decompositions load here
got.append(_compile(hvp(second))(x, s))
from torch._dynamo.utils import counters
ref = [torch.autograd.functional.hvp(f, x, s)[1] for f in (first, second)]
print(json.dumps({"breaks": sum(counters["graph_break"].values()),
                  "err": max(float((a - b).abs().max()) for a, b in zip(got, ref))}))
"""


@pytest.mark.slow
def test_forward_mode_graphs_compile_whole_after_the_decompositions_load():
    """NOTE: [forward mode without TorchScript decompositions]: no graph break at make_dual."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", _TWO_COMPILES], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert doc["err"] < 1e-12
    assert doc["breaks"] == 0
