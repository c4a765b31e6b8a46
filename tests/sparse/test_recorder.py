"""``pipeline.sparse.recorder``: the light tracer records what make_fx records, without dynamo."""

from __future__ import annotations

import operator
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from pipeline.sparse.detect import _decomposition, _decompositions
from pipeline.sparse.recorder import DataDependentRead, record


def _heat(u):
    p = F.pad(u.unsqueeze(0), (1, 1, 1, 1)).squeeze(0)
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * u
    return u - 0.1 * lap * (1 + u**2)


def _writes(v):
    y = torch.zeros(v.shape[0] + 1, dtype=v.dtype)
    y[1:] = v**2
    y[0] += v[3]
    return y.to(torch.float32).cumsum(0)


def _reduce(v):
    return torch.stack([v.sum(), v.max(), torch.logsumexp(v, 0)]) @ torch.ones(3, dtype=v.dtype)


def _ops(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("fn, shape", [(_heat, (6, 6)), (_writes, (7,)), (_reduce, (5,)),
                                       (torch.func.grad(lambda v: (v.sin() * v).sum()), (4,))],
                         ids=["heat", "writes", "reduce", "grad"])
def test_records_the_ops_make_fx_traces(fn, shape):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = record(fn, x, decomposition=_decomposition, refuse_data_dependent=True)
    expected = make_fx(torch.func.functionalize(fn), decomposition_table=_decompositions(),
                       tracing_mode="fake", _allow_non_fake_inputs=True)(x)
    assert _ops(got) == _ops(expected)
    torch.testing.assert_close(got(x), fn(x))  # the graph recomputes fn
    out = next(n for n in got.graph.nodes if n.op == "output").args[0]
    torch.testing.assert_close(out.meta["val"], fn(x))


def test_input_is_not_written_and_value_reads_are_refused():
    x = torch.arange(4.0)

    def writes_input(v):
        v.mul_(2)
        return v + 1

    record(writes_input, x, decomposition=_decomposition, refuse_data_dependent=True)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
    with pytest.raises(DataDependentRead, match="_local_scalar_dense"):
        record(lambda v: v * v.max().item(), x, decomposition=_decomposition,
               refuse_data_dependent=True)
    local = record(lambda v: v * v.max().item(), x, decomposition=_decomposition,
                   refuse_data_dependent=False)
    torch.testing.assert_close(local(x), x * 3)
    scale = torch.tensor(2.0)  # a constant's value may be read
    record(lambda v: v * scale.item(), x, decomposition=_decomposition,
           refuse_data_dependent=True)


def test_first_detection_in_a_fresh_process_imports_no_compiler():
    code = (
        "import sys, torch\n"
        "from jobs import heat\n"
        "from pipeline.sparse.detect import trace_sparsity\n"
        "p = heat.build(N=20, pattern=False)\n"
        "r = trace_sparsity(p.fn, p.x)\n"
        "assert r.pattern.nnz == 5 * 400 - 4 * 20, r.reason\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'sympy') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_global_mode_keeps_stand_ins_of_floating_values_computed_from_x():
    """NOTE: [values not kept]: shapes and dtypes as the values', one element of storage;
    fn(x) itself, constants, integer results and local mode keep their values."""
    x = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def fn(u):
        order = torch.argsort(u[0])  # an integer result computed from x
        return _heat(u)[:, order] * torch.arange(6.0, dtype=u.dtype)

    for refuse, kept_values in ((True, False), (False, True)):
        gm = record(fn, x, decomposition=_decomposition, refuse_data_dependent=refuse)
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        torch.testing.assert_close(out.meta["val"], fn(x))
        torch.testing.assert_close(gm(x), fn(x))
        def whole_(v):
            return v.untyped_storage().nbytes() >= v.numel() * v.element_size()

        for n in nodes:
            val = n.meta["val"]
            if isinstance(val, tuple | list):  # multi-output ops keep their values
                assert all(whole_(v) for v in val), n
                continue
            whole = whole_(val)
            from_x = "arange" not in str(n.target) and n.target is not operator.getitem
            if kept_values or not from_x or not val.is_floating_point() or n is out:
                assert whole, n
            else:
                assert not whole and val.numel() > 1, n
        ints = [n.meta["val"] for n in nodes if n.target is operator.getitem
                and n.meta["val"].dtype == torch.int64]
        assert any(torch.equal(v, torch.argsort(x[0])) for v in ints)
