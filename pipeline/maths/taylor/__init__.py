"""Taylor-mode automatic differentiation for PyTorch: higher derivatives without nesting.

``fn`` is traced once per input shape and dtype to ATen ops, and truncated
Taylor polynomials (jets) are pushed through the graph, one rule per op
(:mod:`._rules`), many directions at once. Operators that sum the top
coefficient over directions (Laplacian, weighted Laplacian, biharmonic)
propagate that sum as one tensor (collapsed Taylor mode)::

    from pipeline.maths.taylor import laplacian, taylor

    lap = laplacian(f)(x)                              # sum_d d^2 f / dx_d^2
    lap = laplacian(f, batched=True)(points)           # (P, D) points, one pass
    est, stderr = laplacian(f, samples=64, seed=0)(x)  # Hutchinson
    f0, d1, d2, d3 = taylor(f, order=3)(x, v)          # D^k f[v, ..., v]

An ATen op without a rule is differentiated by nested forward mode on that op
alone (exact, slower; one :class:`TaylorFallbackWarning` per op); random ops
are refused (:class:`RandomOpError`); non-smooth ops (relu, abs, max, clamp,
where) follow the branch taken at ``x`` and are logged once per trace on the
``pipeline.maths.taylor`` logger.
"""

from ._errors import RandomOpError as RandomOpError
from ._errors import TaylorError as TaylorError
from ._errors import TaylorFallbackWarning as TaylorFallbackWarning
from ._operators import biharmonic as biharmonic
from ._operators import laplacian as laplacian
from ._operators import taylor as taylor
from ._rules import RULES as RULES
from ._trace import clear_cache as clear_cache
