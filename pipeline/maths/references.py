"""torch's own single-process answers, the references every kind is checked against.

``compare`` and the adjoint checks call these through the kind table
(:data:`pipeline.maths.kinds.KIND_MATHS`); they never go through jacpipe's engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.core.kinds import kind_of

if TYPE_CHECKING:
    from pipeline.problem.problem import Problem


def jacobian_reference(problem: Problem) -> Any:
    """``torch.autograd.functional.jacobian`` at ``x``, as ``(m, n)`` numpy."""
    from torch.autograd.functional import jacobian

    j = jacobian(problem.fn, problem.x)
    return j.reshape(-1, problem.x.numel()).detach().cpu().numpy()


def hessian_reference(problem: Problem) -> Any:
    """``torch.autograd.functional.hessian`` at ``x``, as ``(n, n)`` numpy."""
    from torch.autograd.functional import hessian

    h = hessian(lambda t: problem.fn(t).reshape(()), problem.x)
    return h.reshape(problem.x.numel(), -1).detach().cpu().numpy()


def batched_reference(problem: Problem) -> Any:
    """``torch.autograd.functional.jacobian`` of every sample, stacked as ``(B * m, n)``."""
    import torch
    from torch.autograd.functional import jacobian

    blocks = [
        jacobian(problem.fn, problem.x[b]).reshape(-1, problem.x[b].numel())
        for b in range(problem.x.shape[0])
    ]
    return torch.cat(blocks).detach().cpu().numpy()


def batched_reference_rows(problem: Problem, rows: Any) -> Any:
    """Rows of per-sample Jacobians: ``autograd.functional.jacobian`` of each sample touched."""
    import numpy as np
    import torch
    from torch.autograd.functional import jacobian

    xs = problem.x
    n = xs[0].numel()
    m = problem.fn(xs[0]).numel()
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    result = np.empty((len(rows), n), dtype=xs.detach().cpu().numpy().dtype)
    for b in np.unique(rows // m):
        here = np.flatnonzero(rows // m == b)
        jac = jacobian(problem.fn, xs[int(b)].detach()).reshape(m, n)
        result[here] = jac[torch.as_tensor(rows[here] % m)].detach().cpu().numpy()
    return result


def gradient_reference_rows(problem: Problem, rows: Any) -> Any:
    """Rows of a Jacobian (Hessian kind: of the gradient's Jacobian), one autograd.grad each."""
    import numpy as np
    import torch

    x = problem.x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if kind_of(problem.kind).symmetric:
            (grad,) = torch.autograd.grad(problem.fn(x).reshape(()), x, create_graph=True)
            y = grad.reshape(-1)
        else:
            y = problem.fn(x).reshape(-1)
    out = []
    for r in rows:
        (g,) = torch.autograd.grad(y[int(r)], x, retain_graph=True, allow_unused=True)
        out.append(torch.zeros_like(x).reshape(-1) if g is None else g.reshape(-1))
    return torch.stack(out).detach().cpu().numpy() if out else np.zeros((0, x.numel()))
