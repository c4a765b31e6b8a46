"""Products with a network's parameter Jacobian that never form ``J``: sketches and ``J S Jᵀ``.

Both stream blocks of samples through :func:`pipeline.maths.layers.features`
and each piece through column chunks of at most :data:`CHUNK` parameters, so a
process holds one block's per-layer pieces and one chunk of ``J`` at a time.

- :func:`sketch`: ``J(x_i) Ω`` with a seeded ``Ω`` (``P x k``, Gaussian or
  Rademacher), generated chunk by chunk from the seed (:func:`omega`): the
  random projection of per-sample gradients that data attribution stores (TRAK).
  A network of Linear, Conv2d and batch-norm layers is streamed by layer groups
  from one forward pass per block instead (NOTE: [A sketch in a forward +
  backward's memory]).
- :func:`jsj`: ``J(x_i) S J(x_i)ᵀ`` per sample (``(N, O, O)``, or its diagonal
  ``(N, O)``: linearised-Laplace predictive variances) for ``S`` diagonal,
  low-rank plus diagonal, or Kronecker-factored per layer (:class:`Curvature`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.core.errors import JacpipeError
from pipeline.maths.layers import (
    Dense,
    Kron,
    Network,
    NormInfo,
    analyse,
    batch_pass,
    blocks,
    features,
    norm_columns,
    patches,
    positions,
)
from pipeline.maths.ntk import module_function

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.problem.module import ModuleFunction

#: The most parameter columns of ``J`` formed at once.
CHUNK = 4096
#: Entries of ``Ω`` drawn from one seed: rows ``[c R, (c + 1) R)`` with
#: ``R = max(1, OMEGA_ENTRIES // k)`` (``Ω`` is the same whatever the blocks):
#: 1 MiB of float32: a sketch holds one such tile of ``Ω`` at a time.
OMEGA_ENTRIES = 1 << 18


def omega_rows(k: int) -> int:
    """``R``: rows of ``Ω`` per seed, and the most columns of ``J`` a sketch forms at once."""
    return max(1, min(CHUNK, OMEGA_ENTRIES // max(k, 1)))
DISTRIBUTIONS = ("gaussian", "rademacher")


def omega(p: int, k: int, *, seed: int = 0, distribution: str = "gaussian",
          rows: tuple[int, int] | None = None, dtype: Any = torch.float64) -> Tensor:
    """Rows ``[a, b)`` of the seeded ``P x k`` sketching matrix (all rows by default).

    Rows ``[c R, (c + 1) R)`` (:func:`omega_rows`: about :data:`OMEGA_ENTRIES`
    entries) come from a generator seeded with ``(seed, c)``: any block of rows
    is reproducible on its own, and a sketch holds one or two such tiles at a time. Gaussian
    entries are ``N(0, 1)`` drawn in ``dtype`` (a float32 and a float64 ``Ω``
    differ), Rademacher ``±1``; neither is scaled by ``1/sqrt(k)``.
    """
    if distribution not in DISTRIBUTIONS:
        raise JacpipeError(f"sketch: distribution must be one of {DISTRIBUTIONS}, "
                           f"got {distribution!r}")
    a, b = rows or (0, p)
    if b <= a:
        return torch.zeros(0, k, dtype=dtype)
    return _Omega(p, k, seed, distribution, dtype).rows(a, b)


def _omega_chunk(c: int, p: int, k: int, seed: int, distribution: str, dtype: Any) -> Tensor:
    """Rows ``[c R, (c + 1) R)`` of ``Ω`` (:func:`omega_rows`), from the seed ``(seed, c)``."""
    r = omega_rows(k)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + c)
    n = min(r, p - c * r)
    if distribution == "gaussian":
        return torch.randn(n, k, generator=g, dtype=dtype)
    return torch.randint(0, 2, (n, k), generator=g, dtype=dtype).mul_(2).sub_(1)


class _Omega:
    """Rows of ``Ω`` for consecutive column chunks: the last few seed chunks kept."""

    def __init__(self, p: int, k: int, seed: int, distribution: str, dtype: Any,
                 keep: int = 2) -> None:
        self.args = (p, k, seed, distribution, dtype)
        self.kept: dict[int, Tensor] = {}
        self.keep = keep

    def rows(self, a: int, b: int) -> Tensor:
        r = omega_rows(self.args[1])
        parts = []
        for c in range(a // r, (b - 1) // r + 1):
            if c not in self.kept:
                if len(self.kept) >= self.keep:
                    self.kept.pop(next(iter(self.kept)))
                self.kept[c] = _omega_chunk(c, *self.args)
            parts.append(self.kept[c][max(a - c * r, 0):min(b - c * r, r)])
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _offsets(fn: ModuleFunction) -> dict[str, int]:
    return {row["name"]: row["offset"] for row in fn.layout()}


def _chunks(piece: Kron | Dense, offsets: dict[str, int], width: int = CHUNK
            ) -> Iterator[tuple[int, Tensor]]:
    """``(first column of fn, J block (b, O, w))``: a piece's columns, chunk by chunk."""
    if isinstance(piece, Kron):
        info, d_in = piece.info, piece.info.d_in
        step = max(1, width // d_in)
        for c0 in range(0, info.d_out, step):
            c1 = min(c0 + step, info.d_out)
            w = torch.einsum("iotc,itd->iocd", piece.g[..., c0:c1], piece.a)
            yield offsets[info.weight] + c0 * d_in, w.reshape(*w.shape[:2], -1)
        if info.bias is not None:
            yield offsets[info.bias], piece.g.sum(2)
        return
    at = 0
    for name, size in zip(piece.names, piece.sizes, strict=True):
        for c0 in range(0, size, width):
            c1 = min(c0 + width, size)
            yield offsets[name] + c0, piece.jac[:, :, at + c0:at + c1]
        at += size


def _setup(model: Any, xs: Tensor, memory_budget: int, block: int | None, k: int = 0
           ) -> tuple[ModuleFunction, Network, int]:
    """The module function, its layers, and samples per block (from the budget)."""
    fn = module_function(model, xs.dtype)
    net = analyse(fn, xs[0])
    if block is None:
        # one sample's pieces (a, g of every structured layer) and one chunk of J,
        # twice for the backward pass's working memory; one chunk of Ω held beside
        o, itemsize = net.outputs, fn.flat.element_size()
        per = 2 * itemsize * (sum(i.positions * (i.d_in + o * i.d_out) for i in net.layers)
                              + o * (omega_rows(k) + fn.numel - sum(i.numel for i in net.layers)))
        free = memory_budget - 3 * OMEGA_ENTRIES * itemsize
        block = max(1, min(int(xs.shape[0]), free // max(per, 1)))
    return fn, net, block


def sketch(model: Any, xs: Tensor, k: int, *, seed: int = 0, distribution: str = "gaussian",
           block: int | None = None, memory_budget: int = 1 << 30) -> Tensor:
    """``J(x_i) Ω`` for every sample: ``(N, O, k)``, without ``J`` or ``Ω`` in memory.

    Args:
        model: a module (as for :func:`pipeline.ntk`) or ``Problem.from_module(...)``.
        xs: samples ``(N, *in)``.
        k: columns of ``Ω``.
        seed, distribution: ``Ω`` (:func:`omega`).
        block: samples per block; None: from ``memory_budget`` (bytes).
    """
    if distribution not in DISTRIBUTIONS:
        raise JacpipeError(f"sketch: distribution must be one of {DISTRIBUTIONS}, "
                           f"got {distribution!r}")
    fn = module_function(model, xs.dtype)
    net = analyse(fn, xs[0])
    om = _Omega(fn.numel, k, seed, distribution, fn.flat.dtype, keep=1 if not net.rest else 2)
    out = fn.flat.new_zeros(xs.shape[0], net.outputs, k)
    if not net.rest:
        _streamed_sketch(fn, net, xs, om, out, memory_budget, block)
        return out
    fn, net, block = _setup(model, xs, memory_budget, block, k)
    offsets = _offsets(fn)
    for a, b in blocks(xs.shape[0], block):
        for piece in features(fn, xs[a:b], net):
            for g0, jac in _chunks(piece, offsets, omega_rows(k)):
                out[a:b] += jac @ om.rows(g0, g0 + jac.shape[2]).to(jac.device)
    return out


def _activation_bytes(net: Network, itemsize: int) -> int:
    """One sample's share of a forward pass kept for the backward: about two tensors a layer."""
    return 2 * itemsize * sum(_size(i.out_shape) for i in (*net.layers, *net.norms))


def _size(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def _streamed_sketch(fn: ModuleFunction, net: Network, xs: Tensor, om: _Omega, out: Tensor,
                     budget: int, block: int | None) -> None:
    """``out += J Ω`` of a Linear / Conv2d / batch-norm network, block by block.

    NOTE: [A sketch in a forward + backward's memory]
    A block of samples goes forward once (:func:`pipeline.maths.layers.batch_pass`;
    its kept activations about half the budget: ``Ω`` is drawn once per block).
    The layers, in the order of their columns, are taken in groups whose output
    cotangents for every output fit a quarter of the budget: per group,
    backward passes for a few outputs at a time (their cotangents about a
    quarter of the budget) keep that group's ``g`` and stop at its first layer,
    then each layer's Jacobian columns are formed a few rows of ``Ω`` at a
    time (:func:`_layer_columns`: never a whole layer's ``g ⊗ a``) and
    multiplied into the result. ``Ω`` is drawn once per block, a tile at a time.
    """
    itemsize, o = fn.flat.element_size(), net.outputs
    if block is None:  # the forward pass of a block: about half the budget
        block = max(1, min(int(xs.shape[0]), budget // (2 * _activation_bytes(net, itemsize))))
    units = sorted([*net.layers, *net.norms], key=_first_offset(fn))
    index = {u.name: i for i, u in enumerate((*net.layers, *net.norms))}
    for a, b in blocks(xs.shape[0], block):
        inputs, pull = batch_pass(fn, net, xs[a:b])
        for first, group in _groups(units, (b - a) * o * itemsize, budget // 4):
            # outputs per backward pass: its cotangents (a few of the widest
            # activation it passes through, per output) fit the same share
            widest = max(_size(u.out_shape) for u in units[first:])
            per = max(1, min(o, budget // (16 * (b - a) * itemsize * widest)))
            wanted = [index[u.name] for u in group]
            gs = {u.name: fn.flat.new_empty(o, b - a, *u.out_shape[1:]) for u in group}
            for q0, q1 in blocks(o, per):
                cot = fn.flat.new_zeros(q1 - q0, b - a, o)
                for j in range(q1 - q0):
                    cot[j, :, q0 + j] = 1
                for u, g in zip(group, pull(cot, wanted, batched=True), strict=True):
                    gs[u.name][q0:q1] = g
            for u in group:  # a layer's g and patches are freed before the next one's
                _multiply(_layer_columns(fn, u, inputs[index[u.name]], gs.pop(u.name)), om,
                          out[a:b].view(-1, out.shape[2]))


def _multiply(cols: list[tuple[int, int, Any]], om: _Omega, flat: Tensor) -> None:
    """``flat += J Ω`` over one layer's columns, a tile of ``Ω`` at a time."""
    tile = omega_rows(flat.shape[1])
    for offset, size, get in cols:
        for r0, r1 in _cut(offset, size, tile):
            rows = om.rows(offset + r0, offset + r1).to(flat.device)
            flat.addmm_(get(r0, r1).reshape(flat.shape[0], -1), rows)


def _cut(offset: int, size: int, tile: int) -> Iterator[tuple[int, int]]:
    """A parameter's rows ``[0, size)`` (``Ω``'s rows from ``offset``) cut at ``Ω``'s tiles."""
    r = 0
    while r < size:
        r1 = min(size, ((offset + r) // tile + 1) * tile - offset)
        yield r, r1
        r = r1


def _first_offset(fn: ModuleFunction) -> Any:
    offsets = _offsets(fn)
    return lambda u: min(offsets[n] for n in (u.weight, u.bias) if n)


def _groups(units: list[Any], per_output: int, share: int) -> Iterator[tuple[int, list[Any]]]:
    """``(index of the first, layers)``: consecutive layers whose cotangents fit ``share``.

    ``per_output``: bytes of one element of a layer's output over every output and sample.
    """
    group: list[Any] = []
    held = start = 0
    for i, u in enumerate(units):
        size = per_output * _size(u.out_shape)
        if group and held + size > share:
            yield start, group
            group, held, start = [], 0, i
        group.append(u)
        held += size
    if group:
        yield start, group


def _layer_columns(fn: ModuleFunction, unit: Any, x: Tensor, g: Tensor
                   ) -> list[tuple[int, int, Any]]:
    """``(first column of fn, columns, rows -> J columns (b, O, rows))`` per parameter."""
    offsets = _offsets(fn)
    mod = dict(fn.module.named_modules())[unit.name]
    g = positions(mod, g)  # (b, O, T, C)
    if isinstance(unit, NormInfo):
        jac = norm_columns(fn, unit, x, g)
        c = unit.channels
        return [(offsets[n], c, lambda r0, r1, at=i * c: jac[:, :, at + r0:at + r1])
                for i, n in enumerate(unit.names)]
    a = patches(mod, x)
    cols = [(offsets[unit.weight], unit.d_in * unit.d_out,
             lambda r0, r1: _weight_columns(g, a, r0, r1))]
    if unit.bias is not None:
        bias = g.sum(2)
        cols.append((offsets[unit.bias], unit.d_out, lambda r0, r1: bias[:, :, r0:r1]))
    return cols


def _weight_columns(g: Tensor, a: Tensor, r0: int, r1: int) -> Tensor:
    """Columns ``[r0, r1)`` of ``W`` (row-major ``(d_out, d_in)``) of ``sum_t g_t a_tᵀ``.

    Whole output channels by one product, a channel's part by its slice of ``a``:
    no column is formed twice, whatever the rows.
    """
    d = a.shape[2]
    parts, r = [], r0
    while r < r1:
        c = r // d
        if r % d == 0 and r1 - r >= d:
            c1 = r1 // d
            w = torch.einsum("iotc,itd->iocd", g[..., c:c1], a)
            parts.append(w.reshape(*w.shape[:2], -1))
            r = c1 * d
        else:
            e = min(r1, (c + 1) * d)
            parts.append(torch.einsum("iot,itd->iod", g[..., c], a[..., r - c * d:e - c * d]))
            r = e
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


@dataclass(frozen=True)
class Curvature:
    """A positive semi-definite ``S`` over the parameters, in one of three forms.

    Args:
        diagonal: ``(P,)``: ``S = diag(d)`` (with ``low_rank``: ``U Uᵀ + diag(d)``;
            with ``kron``: the diagonal of the parameters no factor covers).
        low_rank: ``(P, r)``: ``U``.
        kron: ``{layer name: (Q, H)}`` for ``Linear`` / ``Conv2d`` layers: the
            block of ``[W | b]`` is ``Q ⊗ H`` with ``Q`` ``(d_out, d_out)`` and
            ``H`` ``(d_in, d_in)``, or ``(d_in + 1, d_in + 1)`` where the bias is
            the last input column (KFAC's homogeneous coordinate).
    """

    diagonal: Tensor | None = None
    low_rank: Tensor | None = None
    kron: dict[str, tuple[Tensor, Tensor]] | None = None


def _kron_block(piece: Kron, q: Tensor, h: Tensor) -> Tensor:
    """``(b, O, O)``: ``J_o S J_pᵀ`` of one layer with ``S = Q ⊗ H`` over ``[W | b]``."""
    a = piece.a
    if h.shape[0] == piece.info.d_in + 1:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    elif h.shape[0] != piece.info.d_in or piece.info.bias is not None:
        raise JacpipeError(
            f"jsj: layer {piece.info.name!r}: H must be ({piece.info.d_in + 1}, "
            f"{piece.info.d_in + 1}) with the bias as the last input column"
            + ("" if piece.info.bias is not None else f" or ({piece.info.d_in}, "
               f"{piece.info.d_in})") + f", got {tuple(h.shape)}")
    m = torch.einsum("iotc,itd->iocd", piece.g, a)
    y = torch.einsum("ce,iqef,df->iqcd", q, m, h)
    return torch.einsum("iocd,iqcd->ioq", m, y)


def jsj(model: Any, xs: Tensor, s: Curvature, *, diagonal: bool = False,
        block: int | None = None, memory_budget: int = 1 << 30) -> Tensor:
    """``J(x_i) S J(x_i)ᵀ`` for every sample, streamed by blocks and column chunks.

    Args:
        model: a module (as for :func:`pipeline.ntk`) or ``Problem.from_module(...)``.
        xs: samples ``(N, *in)``.
        s: the :class:`Curvature`.
        diagonal: return only the diagonal ``(N, O)`` (predictive variances).
        block: samples per block; None: from ``memory_budget`` (bytes).

    Returns:
        ``(N, O, O)``, or ``(N, O)`` with ``diagonal``.

    Raises:
        JacpipeError: an ``S`` of the wrong size, or a factor for a layer that is
            not a structured ``Linear`` / ``Conv2d`` layer.
    """
    fn, net, block = _setup(model, xs, memory_budget, block)
    _check_curvature(s, fn.numel, net)
    offsets = _offsets(fn)
    kron = s.kron or {}
    o = net.outputs
    out = fn.flat.new_zeros(xs.shape[0], o, o)
    for a, b in blocks(xs.shape[0], block):
        ju = None if s.low_rank is None else fn.flat.new_zeros(b - a, o, s.low_rank.shape[1])
        for piece in features(fn, xs[a:b], net):
            if isinstance(piece, Kron) and piece.info.name in kron:
                out[a:b] += _kron_block(piece, *kron[piece.info.name])
                continue
            for g0, jac in _chunks(piece, offsets):
                g1 = g0 + jac.shape[2]
                if s.diagonal is not None:
                    out[a:b] += torch.einsum("iow,w,iqw->ioq", jac, s.diagonal[g0:g1], jac)
                if ju is not None:
                    ju += jac @ s.low_rank[g0:g1]
        if ju is not None:
            out[a:b] += ju @ ju.transpose(1, 2)
    return torch.diagonal(out, dim1=1, dim2=2) if diagonal else out


def _check_curvature(s: Curvature, p: int, net: Network) -> None:
    if s.diagonal is not None and tuple(s.diagonal.shape) != (p,):
        raise JacpipeError(f"jsj: the diagonal must have shape ({p},), got "
                           f"{tuple(s.diagonal.shape)}")
    if s.low_rank is not None and (s.low_rank.dim() != 2 or s.low_rank.shape[0] != p):
        raise JacpipeError(f"jsj: the low-rank factor must have shape ({p}, r), got "
                           f"{tuple(s.low_rank.shape)}")
    names = {i.name for i in net.layers}
    unknown = sorted(set(s.kron or {}) - names)
    if unknown:
        raise JacpipeError(f"jsj: Kronecker factors for {', '.join(unknown)}, which are not "
                           f"Linear / Conv2d layers of the model; expected some of "
                           f"{', '.join(sorted(names))}")
