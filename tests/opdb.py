"""PyTorch's operator database as a corpus of functions with known Jacobians.

``torch.testing._internal.common_methods_invocations.op_db`` (shipped with
torch) lists every public op with sample inputs. Each sample becomes one
function of one tensor, ``f(t) = op(t, *args, **kwargs)`` with all its
floating outputs flattened and concatenated, at ``x = sample.input`` (for a
list input such as ``cat``'s, its first tensor varies and the others are
constants). The helpers here build those functions and their references
(``torch.autograd.functional.jacobian`` for reverse mode, ``torch.func.jacfwd``
for forward mode) for the engine's and the sparsity detector's tests, and for
any check of forward against reverse mode (:data:`EXPECTED_DISAGREEMENTS`).

    for op in ops():
        for sample in samples(op, limit=1):
            case = as_case(op, sample)      # a Case, or a str saying why not
            ...
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

DTYPE = torch.float64

#: Ops whose forward mode (``torch.func.jvp``/``jacfwd``) and reverse mode
#: (``torch.autograd.functional.jacobian``) legitimately give different
#: Jacobians on some op_db samples, with why. A forward/reverse consistency
#: check should flag exactly these; the corpus tests compare each mode with its
#: own reference there.
EXPECTED_DISAGREEMENTS: dict[str, str] = {
    "linalg.cholesky": "the sample input is not symmetric: reverse mode's formula treats it "
                       "as symmetric (it reads one triangle), forward mode differentiates the "
                       "triangle as given",
    "linalg.cholesky_ex": "as linalg.cholesky: a non-symmetric sample input",
    "cholesky": "as linalg.cholesky: a non-symmetric sample input",
    "linalg.eigh": "as linalg.cholesky: a non-symmetric sample input (UPLO reads one triangle)",
    "linalg.eigvalsh": "as linalg.eigh: a non-symmetric sample input",
    "nn.functional.max_unpool1d": "repeated indices: several inputs written to one output, "
                                  "reverse mode sends its gradient to all of them, forward "
                                  "mode takes the one written last",
    "nn.functional.max_unpool1d.grad": "repeated indices (see nn.functional.max_unpool1d)",
    "nn.functional.max_unpool2d": "repeated indices (see nn.functional.max_unpool1d)",
    "nn.functional.max_unpool2d.grad": "repeated indices (see nn.functional.max_unpool1d)",
    "nn.functional.max_unpool3d": "repeated indices (see nn.functional.max_unpool1d)",
    "nn.functional.max_unpool3d.grad": "repeated indices (see nn.functional.max_unpool1d)",
    "cholesky_inverse": "torch's forward-mode formula differs from central differences even "
                        "on the lower triangle the op reads (reverse mode agrees with them "
                        "there and gives the unread upper triangle a symmetrised derivative)",
    "special.entr": "at x < 0, where entr is the constant -inf, one mode gives NaN and the "
                    "other 0 (torch's two formulas)",
    "as_strided_scatter": "torch's reverse mode is wrong (as_strided_scatter_backward passes "
                          "self's gradient through the written region, not the rest); forward "
                          "mode and finite differences agree (jacfwd itself has no batching "
                          "rule for it: compare single jvps)",
    "__rpow__": "the constant bases (args[0]) include negatives, where base ** x and its "
                "derivative log(base) * base ** x are NaN: forward mode's zero tangents times "
                "NaN fill the NaN outputs' rows, reverse mode's zero cotangents times NaN fill "
                "the columns of the exponents feeding them (and, summed over a broadcast "
                "exponent, whole rows of finite outputs); forward mode agrees with central "
                "differences on the finite outputs",
    "logcumsumexp": "torch's forward mode is inaccurate (logcumsumexp_jvp divides by "
                    "cumsum(exp(x - max over dim)) + 1e-13, so where a prefix lies about 17 "
                    "below the dim's maximum the derivative is off by up to 3.2e-6); reverse "
                    "mode and float64 central differences agree",
    "nn.functional.embedding": "reverse mode departs from the derivative by design: with "
                               "padding_idx the padding row gets no gradient, with "
                               "scale_grad_by_freq each row's gradient is divided by how often "
                               "its index occurs (1/3 here), while forward mode gives the plain "
                               "derivative 1 and agrees with central differences",
    "masked.prod": "op_db fills the diagonal of the 2-D samples with inf, -inf and NaN (in "
                   "place on one shared tensor, so the collected samples all carry NaN): "
                   "where a selected NaN makes an output NaN, forward mode's zero tangents "
                   "times NaN fill that output's row (masked-out inputs included), reverse "
                   "mode's zero cotangents times NaN fill the columns of the inputs feeding "
                   "it (rows of finite outputs included); forward mode agrees with central "
                   "differences on the finite outputs",
    "masked.amax": "a NaN diagonal in the 2-D samples (see masked.prod)",
    "masked.amin": "a NaN diagonal in the 2-D samples (see masked.prod)",
    "masked.norm": "an inf or NaN diagonal in the 2-D samples (see masked.prod; the norm of "
                   "an inf is inf, where forward mode's tangent sum(x * t) / norm is NaN)",
    "masked.mean": "where the mask selects nothing in a slice its mean is 0 / 0 = NaN: forward "
                   "mode's tangent there is NaN in every column, reverse mode gives the "
                   "masked-out inputs 0",
    "masked.logsumexp": "a NaN diagonal in the 2-D samples (see masked.prod), and where the "
                        "mask selects nothing in a slice the output is log 0 = -inf, with a "
                        "NaN forward tangent against reverse mode's 0 (see masked.mean)",
    "masked.softmax": "where the mask selects nothing in a row the outputs are 0 / 0 = NaN: "
                      "forward mode's tangents there are NaN in every column, reverse mode "
                      "gives the masked-out inputs 0",
    "masked.log_softmax": "a row the mask leaves empty (see masked.softmax)",
    "masked.softmin": "a row the mask leaves empty (see masked.softmax)",
    "masked.logaddexp": "where input_mask and other_mask both leave a position out the output "
                        "is logaddexp(-inf, -inf) = -inf: forward mode's tangent there is "
                        "t * exp(-inf - -inf) = NaN in every column, reverse mode gives 0",
}

#: Ops that, given repeated indices, keep whichever write lands last: on several threads
#: that order, and with it the output and its forward-mode derivative, changes from call to
#: call (torch's own ``jacfwd`` of ``max_unpool2d`` gave two different Jacobians on 3 of its
#: 288 samples, 2 threads; never on 1). Their forward rows are compared on one thread
#: (:func:`write_order_fixed`).
WRITE_ORDER_OPS = frozenset(f"nn.functional.max_unpool{d}d{grad}" for d in (1, 2, 3)
                            for grad in ("", ".grad"))


@contextlib.contextmanager
def write_order_fixed(name: str) -> Iterator[None]:
    """One torch thread while ``name`` is one of :data:`WRITE_ORDER_OPS` (else nothing)."""
    if name not in WRITE_ORDER_OPS:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: Largest ``m * n`` of the sample :func:`pick` prefers (the loop reference costs m backwards).
SMALL = 2500
#: Largest ``m * n`` and ``m`` :func:`pick` takes at all (larger: the all-samples corpus only).
LARGE = 200_000
MOST_ROWS = 500
#: Largest ``m * n`` of the all-samples corpus (slice_scatter's 8000 x 8000 is left out).
HUGE = 4_000_000


@dataclass(frozen=True)
class Case:
    """One op sample as a function of one tensor."""

    name: str  # op name, with its variant ("nn.functional.conv2d", "max.reduction_with_dim")
    fn: Callable[[torch.Tensor], torch.Tensor]
    x: torch.Tensor
    forward_ad: bool  # the op supports forward-mode AD (jacfwd is a reference)

    m: int  # outputs (rows of the Jacobian)
    #: The random ops ``fn`` draws from a generator it seeds itself (op_db's
    #: ``wrapper_set_seed``: a training ``multi_head_attention_forward`` drops out with
    #: ``bernoulli_``): deterministic, but sparsity detection refuses any draw it traces.
    seeded_draws: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return self.m * self.x.numel()


def ops() -> list:
    """The ops of op_db with autograd support and a float64 CPU kernel."""
    from torch.testing._internal.common_methods_invocations import op_db

    return [op for op in op_db if op.supports_autograd
            and DTYPE in op.supported_dtypes("cpu")]


def op_id(op: object) -> str:
    """``name`` or ``name.variant`` (op_db has several entries per name)."""
    variant = getattr(op, "variant_test_name", "")
    return f"{op.name}.{variant}" if variant else op.name


def samples(op: object, limit: int | None = 1) -> list:
    """The first ``limit`` float64 CPU samples of ``op`` (None: all), drawn seeded."""
    torch.manual_seed(0)  # sample_inputs draws from the global generator
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = []
        for sample in op.sample_inputs("cpu", DTYPE, requires_grad=False):
            out.append(sample)
            if limit is not None and len(out) >= limit:
                break
    return out


def random_op(op: object) -> bool:
    """Whether ``op`` draws random numbers (dropout, bernoulli, normal, ...; op_db seeds them
    inside its wrapper, so each is deterministic there, but has no Jacobian worth checking)."""
    leaf = op.name.split(".")[-1]
    return ("dropout" in op.name or leaf in {"bernoulli", "multinomial", "normal", "uniform",
                                              "cauchy", "exponential", "geometric",
                                              "log_normal", "poisson", "rand_like",
                                              "randn_like", "randint_like", "rrelu",
                                              "svd_lowrank", "pca_lowrank"}
            or "fractional_max_pool" in op.name)


def uninitialised(op: object) -> bool:
    return op.name.split(".")[-1] in {"empty", "empty_like", "new_empty", "empty_strided",
                                      "new_empty_strided", "empty_permuted"}


def floating_outputs(out: object) -> list[torch.Tensor]:
    """Every floating tensor in an op's output, in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, tuple | list):
        return [t for o in out for t in floating_outputs(o)]
    return []


def _draws(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
           ) -> tuple[bool, tuple[str, ...]]:
    """Whether ``fn`` advances the default generator (e.g. a dropout whose mask the output
    never sees: detection refuses the draw all the same), and the random ops it runs that
    draw (:func:`~pipeline.sparse.randomness.draws_random`; op_db's seeded wrapper puts
    the generator back, so these may draw without advancing it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pipeline.sparse.randomness import draws_random

    seen: list[str] = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            if draws_random(func, args, kwargs):
                seen.append(str(func))
            return func(*args, **(kwargs or {}))

    def advances(watch: contextlib.AbstractContextManager) -> bool:
        torch.manual_seed(1)
        state = torch.get_rng_state()
        with watch:
            fn(x.clone())
        return not torch.equal(state, torch.get_rng_state())

    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return advances(Watch()), tuple(dict.fromkeys(seen))
        except Exception:  # noqa: BLE001 - an op that refuses the watch: its state alone
            try:
                return advances(contextlib.nullcontext()), ()
            except Exception:  # noqa: BLE001 - judged by the caller's own call
                return False, ()


def as_case(op: object, sample: object) -> Case | str:
    """The sample as a :class:`Case`, or a one-line reason it is not a function of x."""
    x, rest = sample.input, None
    if isinstance(x, list | tuple) and x and isinstance(x[0], torch.Tensor):
        x, rest = x[0], list(x[1:])
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
        return "skip: input is not a non-empty floating tensor"
    if x.layout != torch.strided:
        return "skip: a sparse input"
    args, kwargs = sample.args, sample.kwargs
    if random_op(op) or uninitialised(op) or float(kwargs.get("dropout_p") or 0) > 0:
        return "skip: random or uninitialised"  # dropout_p: scaled_dot_product_attention's

    def fn(t: torch.Tensor) -> torch.Tensor:
        outs = floating_outputs(op.op(t if rest is None else [t, *rest], *args, **kwargs))
        return torch.cat([o.reshape(-1) for o in outs]) if outs else t.new_zeros(0)

    x = x.detach().clone()
    before = x.clone()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = fn(x)
    except Exception as exc:  # noqa: BLE001 - the op itself refuses the sample: not ours
        return f"skip: the op raises ({type(exc).__name__})"
    advances, seeded = _draws(fn, before)
    if advances:
        return "skip: random or uninitialised"  # a draw op_db's wrapper does not seed
    if not torch.isclose(x, before, rtol=0, atol=0, equal_nan=True).all():
        # embedding's max_norm renormalises its weight in place: refused (InputWriteError),
        # as torch.autograd.functional.jacobian refuses it
        return "skip: the op writes into its input"
    x = before
    if y.numel() == 0:
        return "skip: no floating output"
    return Case(op_id(op), fn, x, bool(op.supports_forward_ad), int(y.numel()), seeded)


def cases(limit: int | None = None) -> Iterator[tuple[object, Case | str]]:
    """``(op, case or skip reason)``: every sample of every op (``limit``: the first ones)."""
    for op in ops():
        try:
            found = samples(op, limit)
        except Exception as exc:  # noqa: BLE001 - a broken sample generator in torch
            yield op, f"skip: no samples ({type(exc).__name__})"
            continue
        for sample in found:
            case = as_case(op, sample)
            if not isinstance(case, str) and case.size > HUGE:
                case = "skip: a dense reference Jacobian would be too large"
            yield op, case


@functools.cache
def picked() -> tuple[tuple[object, Case | str], ...]:
    """``(op, pick(op))`` for every op, built once per process (both corpus tests use it)."""
    return tuple((op, pick(op)) for op in ops())


def pick(op: object, among: int = 8) -> Case | str:
    """One sample of ``op``: the first of its first ``among`` with ``m * n <= SMALL``, else
    the smallest of them if not over ``LARGE`` (the default corpus: one sample per op,
    cheap to check)."""
    best: Case | str = "skip: no samples"
    try:
        found = samples(op, among)
    except Exception as exc:  # noqa: BLE001 - a broken sample generator in torch
        return f"skip: no samples ({type(exc).__name__})"
    for sample in found:
        case = as_case(op, sample)
        if isinstance(case, str):
            best = case if isinstance(best, str) else best
            continue
        if isinstance(best, str) or case.size < best.size:
            best = case
        if case.size <= SMALL:
            break
    if not isinstance(best, str) and (best.size > LARGE or best.m > MOST_ROWS):
        return "skip: every sample is large (checked by the all-samples corpus)"
    return best


def reverse_jacobian(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """``(m, n)`` Jacobian by ``torch.autograd.functional.jacobian`` (reverse mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        j = torch.autograd.functional.jacobian(fn, x)
    return j.reshape(-1, x.numel())


def batched_jacobian(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """``(m, n)`` Jacobian by ``torch.func.jacrev`` (vmap over reverse mode; faster than the
    loop of :func:`reverse_jacobian`), or by that loop where vmap cannot run the op."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            j = torch.func.jacrev(fn)(x)
        return j.reshape(-1, x.numel())
    except Exception:  # noqa: BLE001 - no batching rule: the loop
        return reverse_jacobian(fn, x)


def forward_jacobian(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """``(m, n)`` Jacobian by ``torch.func.jacfwd`` (forward mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        j = torch.func.jacfwd(fn)(x)
    return j.reshape(-1, x.numel())


def points(case: Case, count: int = 3) -> list[torch.Tensor]:
    """``x`` and ``count - 1`` seeded nearby points (each entry moved by up to 10%)."""
    gen = torch.Generator().manual_seed(1)
    out = [case.x]
    for _ in range(count - 1):
        noise = torch.rand(case.x.shape, generator=gen, dtype=case.x.dtype) * 0.2 + 0.9
        out.append(case.x * noise)
    return out


def nonzeros(j: torch.Tensor) -> torch.Tensor:
    """Where a reference Jacobian is a finite nonzero (a NaN is no structural fact)."""
    return torch.isfinite(j) & (j != 0)


def disagreement(got: torch.Tensor, want: torch.Tensor, *, rtol: float = 1e-7) -> float | None:
    """None when ``got`` equals ``want`` to ``rtol`` (relative to ``max(1, |want|)``, NaN
    equal to NaN, infinities equal), else the largest error."""
    if got.shape != want.shape:
        return float("inf")
    finite = torch.isfinite(want)
    scale = max(1.0, float(want[finite].abs().max())) if finite.any() else 1.0
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    err = torch.where(same, 0.0, (got - want).abs().nan_to_num(nan=float("inf")))
    worst = float(err.max()) if err.numel() else 0.0
    return None if worst <= rtol * scale else worst


def modes_disagree(case: Case) -> bool | None:
    """Whether ``jacfwd`` and reverse mode differ on this case (None: jacfwd fails here)."""
    if not case.forward_ad:
        return None
    try:
        fwd = forward_jacobian(case.fn, case.x)
    except Exception:  # noqa: BLE001 - torch's own forward mode refuses the op
        return None
    return disagreement(fwd, reverse_jacobian(case.fn, case.x)) is not None
