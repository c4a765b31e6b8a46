"""Coefficient arithmetic of truncated Taylor series: Cauchy products and compositions.

A *jet* of order K is a list ``[x0, x1, ..., xK]`` of tensors, each with a
leading *direction* axis: ``x0`` has length 1 (the point is shared), ``x1 ..
x(K-1)`` have length R (one row per direction) and ``xK`` has length R, or 1
when the series is *collapsed* (NOTE: [collapsed top coefficient]).

NOTE: [normalized coefficients]
Coefficients are normalized: for a curve ``x(t) = x0 + x1 t + x2 t^2 + ...``
the jet of ``y(t) = f(x(t))`` holds ``y_k = y^(k)(0) / k!``. Along a straight
line ``x(t) = x0 + t v`` (``x1 = v``, higher ones zero), ``y_k = D^k f[v, ..., v] /
k!``. Products are then Cauchy products, ``[a b]_k = sum_i a_i b_(k-i)``, and a
function ``g`` composes by Faa di Bruno in the form
``y_k = sum_(j=1..k) g^(j)(x0) / j! * [u^j]_k`` with ``u = x - x0`` (so
``[u^j]_k`` vanishes for ``k < j``).

NOTE: [collapsed top coefficient]
Operators such as the Laplacian need only ``sum_d w_d y_K[d]`` over the
directions. Every top coefficient is linear in the inputs' top coefficients
with direction-free factors (``y_K = g'(x0) x_K + (terms in x_1..x_(K-1))``):
so the inputs' tops can be summed *before* propagation, and the terms that
multiply two lower coefficients (both per direction) are summed over the
directions where they are formed. Through a linear op the top is one tensor
instead of R (Dangel et al., "Collapsing Taylor Mode Automatic
Differentiation", NeurIPS 2025). In a Cauchy product the top's terms with
index 0 or K are the edge terms (direction-free times summed); the others are
summed by :meth:`Series.reduce`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

Coeffs = list  # list[torch.Tensor | None]: None is a zero coefficient


class Series:
    """The shape of the jets under way: the order, the directions and whether the top is summed.

    Args:
        order: K, the highest coefficient.
        directions: R, the length of the direction axis of ``x1 ... x(K-1)``.
        collapsed: whether ``xK`` holds ``sum_d w_d xK[d]`` (length 1).
        weights: the ``w_d`` of the collapsed sum (``None``: all ones).
    """

    def __init__(self, order: int, directions: int, *, collapsed: bool = False,
                 weights: torch.Tensor | None = None) -> None:
        self.order = order
        self.directions = directions
        self.collapsed = collapsed and order > 0
        self.weights = weights
        self.overwrite = False  # the op under way may overwrite its argument's coefficients

    def size(self, k: int) -> int:
        """The length of coefficient ``k``'s direction axis."""
        if k == 0 or (self.collapsed and k == self.order):
            return 1
        return self.directions

    def is_top(self, k: int) -> bool:
        return self.collapsed and k == self.order

    def reduce(self, t: torch.Tensor) -> torch.Tensor:
        """``sum_d w_d t[d]`` over the direction axis, keeping it (length 1)."""
        if t.shape[0] == 1 and self.directions != 1:  # direction-free: every row is t[0]
            total = self.directions if self.weights is None else self.weights.sum()
            return t * total
        if self.weights is None:
            return t.sum(0, keepdim=True)
        return torch.tensordot(self.weights.to(t.dtype), t, dims=1).unsqueeze(0)


def add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def cauchy(s: Series, a: Sequence, b: Sequence, k: int,
           prod: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.mul,
           *, start: int = 0) -> torch.Tensor | None:
    """``[a b]_k = sum_(i=start..k) prod(a_i, b_(k-i))`` (``None`` entries are zeros).

    In a collapsed series the top's middle terms are summed over the
    directions (NOTE: [collapsed top coefficient]).
    """
    if s.is_top(k) and k == 2 and a is b and start == 0 and a[0] is None and _square_ok(s, a[1]):
        # the Laplacian's one middle term, sum_d x1_d^2: one pass, no temporary
        return torch.linalg.vector_norm(a[1], dim=0, keepdim=True).square()
    edge, mid = None, None
    for i in range(start, k + 1):
        ai, bj = a[i], b[k - i]
        if ai is None or bj is None:
            continue
        term = prod(ai, bj)
        if s.is_top(k) and 0 < i < k:
            mid = add(mid, term)
        else:
            edge = add(edge, term)
    return add(edge, None if mid is None else s.reduce(mid))


def _square_ok(s: Series, t: torch.Tensor | None) -> bool:
    """Whether ``sum_d t_d^2`` may be a norm (no weights; no autograd: its gradient at 0 is nan)."""
    return (t is not None and s.weights is None and t.shape[0] == s.directions
            and not (torch.is_grad_enabled() and t.requires_grad)
            and not _wrapped(t))  # grad transforms


def compose(s: Series, x: Sequence[torch.Tensor], d: Sequence[torch.Tensor | None], *,
            overwrite: bool = False) -> Coeffs:
    """The jet of ``g(x)`` from ``d[j] = g^(j)(x0) / j!`` (Faa di Bruno, normalized).

    Args:
        s: the series.
        x: the argument's jet.
        d: the Taylor coefficients of ``g`` at ``x0``, ``d[0] = g(x0)`` (``None``: zero).
        overwrite: ``x``'s higher coefficients are temporaries nobody else holds: the
            linear term ``d[1] x_k`` is formed in their memory.
    """
    order = s.order
    u = [None, *x[1:]]
    powers = {1: u}  # u^j
    for j in range(2, order + 1):
        powers[j] = [None] * j + [cauchy(s, powers[j - 1], u, k) for k in range(j, order + 1)]
    out: Coeffs = [d[0]] + [None] * order
    for k in range(1, order + 1):
        acc = None
        for j in range(2, k + 1):
            if d[j] is not None and powers[j][k] is not None:
                acc = add(acc, d[j] * powers[j][k])
        if d[1] is not None:
            if overwrite and _writable(u[k], d[1], acc):
                lin = u[k].mul_(d[1])  # every power of u is formed already
                acc = lin if acc is None else lin.add_(acc)
            else:
                acc = add(d[1] * u[k], acc)
        out[k] = acc
    return [t if t is not None else torch.zeros_like(x[k]) for k, t in enumerate(out)]


def _writable(t: torch.Tensor, d1: torch.Tensor, acc: torch.Tensor | None) -> bool:
    return (t.is_contiguous() and not t.requires_grad and t.dtype == d1.dtype
            and d1.shape[1:] == t.shape[1:] and (acc is None or acc.shape == t.shape)
            and not torch.compiler.is_compiling()  # (compiled: fused anyway, no in-place)
            and not any(_wrapped(a) for a in (t, d1, acc) if a is not None))  # under vmap/grad


def _wrapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is a functorch (vmap/grad) wrapper; False while torch.compile traces,
    which cannot trace the test (NOTE: [compiled jet passes] in ``_operators.py``)."""
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.is_functorch_wrapped_tensor(t))


def scalar_series(order: int) -> Series:
    """A series along ``t`` alone (one direction, nothing collapsed)."""
    return Series(order, 1)


def univariate(ode: Callable[[Coeffs, int], torch.Tensor], y0: torch.Tensor,
               order: int) -> list[torch.Tensor]:
    """Taylor coefficients of ``y(x0 + t)`` from ``y' = a(y)``: ``y_k = a_(k-1) / k``.

    ``ode(y, m)`` returns ``a_m`` from ``y_0 .. y_m``.
    """
    y = [y0]
    for k in range(1, order + 1):
        y.append(ode(y, k - 1) / k)
    return y


def tanh_coeffs(x0: torch.Tensor, order: int) -> list[torch.Tensor]:
    s = scalar_series(order)

    def ode(y: Coeffs, m: int) -> torch.Tensor:  # tanh' = 1 - tanh^2
        sq = cauchy(s, y, y, m)
        return 1 - sq if m == 0 else -sq

    return univariate(ode, torch.tanh(x0), order)


def tan_coeffs(x0: torch.Tensor, order: int) -> list[torch.Tensor]:
    s = scalar_series(order)

    def ode(y: Coeffs, m: int) -> torch.Tensor:  # tan' = 1 + tan^2
        sq = cauchy(s, y, y, m)
        return 1 + sq if m == 0 else sq

    return univariate(ode, torch.tan(x0), order)


def sigmoid_coeffs(x0: torch.Tensor, order: int, scale: float = 1.0) -> list[torch.Tensor]:
    """Coefficients of ``sigmoid(scale * (x0 + t))``."""
    s = scalar_series(order)

    def ode(y: Coeffs, m: int) -> torch.Tensor:  # sigma' = scale * (sigma - sigma^2)
        return scale * (y[m] - cauchy(s, y, y, m))

    return univariate(ode, torch.sigmoid(scale * x0), order)


def exp_coeffs(x0: torch.Tensor, order: int) -> list[torch.Tensor]:
    e = torch.exp(x0)
    return [e] + [e / math.factorial(k) for k in range(1, order + 1)]


def log_coeffs(x0: torch.Tensor, order: int) -> list[torch.Tensor]:
    r = torch.reciprocal(x0)
    out, p = [torch.log(x0)], r
    for k in range(1, order + 1):
        out.append(p * ((-1) ** (k + 1) / k))
        p = p * r
    return out


def sin_coeffs(x0: torch.Tensor, order: int, *, shift: int = 0) -> list[torch.Tensor]:
    """Coefficients of ``sin`` (``shift=0``) or ``cos`` (``shift=1``) at ``x0``."""
    sn, cs = torch.sin(x0), torch.cos(x0)
    cycle = [sn, cs, -sn, -cs]
    return [cycle[(k + shift) % 4] / math.factorial(k) for k in range(order + 1)]


def sinh_coeffs(x0: torch.Tensor, order: int, *, shift: int = 0) -> list[torch.Tensor]:
    """Coefficients of ``sinh`` (``shift=0``) or ``cosh`` (``shift=1``) at ``x0``."""
    pair = [torch.sinh(x0), torch.cosh(x0)]
    return [pair[(k + shift) % 2] / math.factorial(k) for k in range(order + 1)]


def binomials(p: float | torch.Tensor, order: int) -> list:
    """``binom(p, j)`` for ``j = 0..order`` (generalized)."""
    out, c = [1.0], 1.0
    for j in range(1, order + 1):
        c = c * (p - (j - 1)) / j
        out.append(c)
    return out


def pow_coeffs(x0: torch.Tensor, p: float | torch.Tensor, order: int) -> list:
    """Coefficients of ``x^p`` at ``x0``: ``binom(p, j) x0^(p - j)``.

    A vanishing binomial (integer ``p < j``) gives an exact zero even where
    ``x0^(p - j)`` is infinite.
    """
    out = []
    for j, c in enumerate(binomials(p, order)):
        if isinstance(c, float):
            out.append(None if c == 0.0 else c * torch.pow(x0, p - j))
        else:
            out.append(torch.where(c == 0, 0.0, c * torch.pow(x0, p - j)))
    out[0] = torch.pow(x0, p)
    return out


def divide(s: Series, a: Sequence, b: Sequence) -> Coeffs:
    """The jet of ``a / b``: ``z_k = (a_k - sum_(j=1..k) b_j z_(k-j)) / b0``."""
    z: Coeffs = [a[0] / b[0]] + [None] * s.order
    for k in range(1, s.order + 1):
        acc = cauchy(s, b, z, k, start=1)
        num = a[k] if acc is None else (acc * -1 if a[k] is None else a[k] - acc)
        z[k] = num / b[0]
    return z


def erf_coeffs(x0: torch.Tensor, order: int) -> list[torch.Tensor]:
    """Coefficients of ``erf`` at ``x0``: ``erf' = 2/sqrt(pi) exp(-x^2)``."""
    if order == 0:
        return [torch.erf(x0)]
    gp = [None, -2 * x0, torch.full_like(x0, -2.0)]  # j g_j for g = -(x0 + t)^2
    e = [torch.exp(-x0 * x0)]
    for k in range(1, order):  # e = exp(g): k e_k = sum_j j g_j e_(k-j)
        e.append(sum(gp[j] * e[k - j] for j in range(1, min(k, 2) + 1)) / k)
    c = 2 / math.sqrt(math.pi)
    return [torch.erf(x0)] + [c * e[k - 1] / k for k in range(1, order + 1)]


def integrated(y0: torch.Tensor, x0: torch.Tensor, order: int, quad: tuple[float, float, float],
               power: float) -> list[torch.Tensor]:
    """Coefficients of ``y`` at ``x0`` from ``y' = q(x)^power`` with ``q = a + b x + c x^2``.

    The inverse trigonometric and hyperbolic functions (``asin' = (1 - x^2)^(-1/2)``):
    ``q(x0 + t)`` is a quadratic in ``t``, its power a composition, and
    ``y_k = [q^power]_(k-1) / k``.
    """
    if order == 0:
        return [y0]
    a, b, c = quad
    s = scalar_series(order - 1)
    q0 = a + b * x0 + c * x0 * x0
    q = [q0, b + 2 * c * x0, torch.full_like(x0, c)] + [None] * order
    r = compose(s, [q0, *q[1:order]], pow_coeffs(q0, power, order - 1))
    return [y0] + [r[k - 1] / k for k in range(1, order + 1)]


class Jet(list):
    """A tensor's Taylor coefficients ``[x0, x1, ..., xK]``, each with a leading direction axis."""

    __slots__ = ()

    @property
    def primal(self) -> torch.Tensor:
        return self[0][0]
