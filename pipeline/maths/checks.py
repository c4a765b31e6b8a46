"""The checks every engine call makes of its rows: forward against reverse mode, vmap against none.

NOTE: [Checks on every engine call]
    Two ways a vectorised derivative can be silently wrong, each checked
    where the rows are computed, at the cost of about one extra backward
    pass per engine call (a run's shards skip what the run's own checks
    already covered: :func:`checking`):

    - *forward mode* (``torch.func.jvp``) ignores what reverse mode honours
      (``torch.no_grad`` blocks, tensor hooks, module backward hooks, a
      custom ``autograd.Function`` whose ``jvp`` disagrees with its
      ``backward``). Where a call computed rows by forward mode, random
      ``u`` (over those rows; per-sample: over every sample of the call) and
      ``v`` give ``u . (J v)`` from the rows themselves and ``(Jᵀ u) . v`` from
      one plain reverse pass; they agree to rounding (NOTE: [The adjoint
      check] in :mod:`pipeline.maths.adjoint`, same tolerance) exactly when
      both modes differentiate the same function. A disagreement is
      reported (:class:`ForwardModeWarning`); under the ``fallback`` policy
      (``pipeline.run`` with ``--method auto`` / ``sparse``) the rows are
      computed again by reverse mode.
    - *vmap* has wrong batching rules for a few ops (``torch.cdist``'s
      backward in torch 2.x: ``torch.func.jacrev`` is wrong by 80-200%
      there, ``autograd.functional.jacobian`` right). Where a call computed
      rows by a vectorised reverse pass, a random combination of up to
      :data:`SPOT_ROWS` random rows of its first chunk is computed again
      without vmap (one unbatched backward) and compared;
      on a disagreement the call's rows are computed one at a time with
      ``torch.autograd.grad`` (the engine's per-row fallback), and said so.

    A sparse (compressed) evaluation checks its decompressed rows instead,
    which also refuses a pattern that misses a nonzero (NOTE: [the check of a
    compressed evaluation] in :mod:`pipeline.sparse.compressed`); repeated
    evaluations of the same function, pattern and shapes are checked on
    their first call and then on a schedule (NOTE: [Spaced checks of
    repeated evaluations]).

    The policy of a call and where its reports go are context variables
    (:func:`checking`): the engine's signatures stay as they were, the
    worker sets them around a shard and records the reports in the shard's
    manifest entry, and a direct engine call warns.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: Tolerance of the forward/reverse comparison, relative to the Cauchy-Schwarz
#: bound (NOTE: [Tolerance of the adjoint check]): 100 machine epsilons.
ADJOINT_RTOL = {"float32": 100 * 2.0**-23, "float64": 100 * 2.0**-52}
#: Tolerance of the vmap spot check, relative to the row's norm: the square
#: root of the machine epsilon. A batched and an unbatched kernel sum in
#: different orders, and a row may be a small difference of large terms; a
#: wrong batching rule is off by tens of percent (NOTE: [Tolerance of the
#: vmap spot check] in benchmarks/checks.py measures both).
SPOT_RTOL = {"float32": 2.0**-11.5, "float64": 2.0**-26}
#: What a call does when forward mode disagrees with reverse mode.
POLICIES = ("warn", "fallback", "reverse")


class ForwardModeWarning(UserWarning):
    """Forward mode gave another derivative than reverse mode (autograd's) on these rows."""


class VmapMismatchWarning(UserWarning):
    """Vectorised rows differ from the same rows computed without vmap (torch's batching rule)."""


_FORWARD: contextvars.ContextVar[str] = contextvars.ContextVar("jacpipe_forward", default="warn")
_VECTORISE: contextvars.ContextVar[bool] = contextvars.ContextVar("jacpipe_vectorise",
                                                                  default=True)
_LOG: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("jacpipe_checks_log",
                                                                        default=None)
_CHECK_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("jacpipe_check_forward",
                                                                      default=True)
_CHECK_VMAP: contextvars.ContextVar[bool] = contextvars.ContextVar("jacpipe_check_vmap",
                                                                   default=True)
_EVERY_CALL: contextvars.ContextVar[bool | None] = contextvars.ContextVar("jacpipe_every_call",
                                                                          default=None)
#: Rows of a chunk the vmap spot check combines (drawn at random): reading the
#: whole chunk again cost 5% of a 2000-row mlp shard.
SPOT_ROWS = 32


@contextlib.contextmanager
def checking(*, forward: str = "warn", vectorise: bool = True,
             log: list[str] | None = None, check_forward: bool = True,
             check_vmap: bool = True, every_call: bool | None = None) -> Iterator[None]:
    """Set the policy of the engine calls inside the block.

    Args:
        forward: ``"warn"`` (keep forward mode's rows, report the
            disagreement: an explicit ``--method fwd``), ``"fallback"`` (on a
            disagreement compute the rows again by reverse mode, and report
            it: ``--method auto``), or ``"reverse"`` (the run's check already
            found one: wherever a path may choose, it uses reverse mode).
        vectorise: ``False``: rows one ``autograd.grad`` at a time (the run's
            spot check found a wrong batching rule).
        log: where reports go (one line each, no repeats) instead of
            :func:`warnings.warn`.
        check_forward: False where the run's own adjoint check already
            compared forward with (vectorised) reverse mode at this very
            point: a shard of a ``jacobian`` or ``hessian`` run computes the
            same function at the same ``x``, so its calls skip the check
            (one VJP: 13-25% of a tall forward-mode Jacobian's time,
            ``benchmarks/checks.py``). Per-sample shards keep it: their
            samples are not the ones the run checked.
        check_vmap: False where the run's vmap spot check already compared
            vectorised rows of this function with plain autograd's: a
            shard's calls skip their own (one unbatched pass of one sample:
            40% of a 16-image CNN shard, whose convolutions run slowly on
            one unbatched image).
        every_call: True (the default, as ``JACPIPE_CHECK_EVERY_CALL`` unset
            or ``1``): repeated calls check every call; False (or
            ``JACPIPE_CHECK_EVERY_CALL=0``): a repeated compressed evaluation
            is checked on :func:`due`'s schedule, and the front door's
            remembered calls on every ``SPOT_EVERY``-th (NOTE: [Spaced checks
            of repeated evaluations]); ``None``: as the enclosing block.

    Raises:
        ValueError: an unknown ``forward`` policy.
    """
    if forward not in POLICIES:
        raise ValueError(f"forward must be one of {POLICIES}, got {forward!r}")
    tokens = (_FORWARD.set(forward), _VECTORISE.set(vectorise), _LOG.set(log),
              _CHECK_FORWARD.set(check_forward), _CHECK_VMAP.set(check_vmap),
              _EVERY_CALL.set(_EVERY_CALL.get() if every_call is None else every_call))
    try:
        yield
    finally:
        _EVERY_CALL.reset(tokens[5])
        _CHECK_VMAP.reset(tokens[4])
        _CHECK_FORWARD.reset(tokens[3])
        _LOG.reset(tokens[2])
        _VECTORISE.reset(tokens[1])
        _FORWARD.reset(tokens[0])


def forward_policy() -> str:
    """The forward-mode policy of the calls now running (:func:`checking`)."""
    return _FORWARD.get()


def forward_checks() -> bool:
    """Whether the calls now running check their forward-mode rows (:func:`checking`)."""
    return _CHECK_FORWARD.get()


# NOTE: [Spaced checks of repeated evaluations]
#     A Newton or time-stepping loop evaluates the same compressed Jacobian or
#     Hessian (same function object, pattern and colouring objects, rows,
#     shapes, dtype) many times, and compiled, its check (one reverse pass)
#     costs 10-100% of an evaluation. By default every call is checked: a
#     rule that is wrong at some points only (a dependency whose derivative
#     vanishes where the loop started, a forward-mode formula wrong at some
#     values) is then never returned unchecked. A caller who trades that for
#     speed sets ``checking(every_call=False)`` or
#     ``JACPIPE_CHECK_EVERY_CALL=0``: the first call of each such evaluation
#     (and its first compiled one) is checked, so a pattern that misses a
#     nonzero or a forward-mode rule that disagrees with reverse mode is
#     refused or reported there, at the point the loop starts from; later
#     calls when the evaluation seconds since the last check reach ``last
#     check's seconds / CHECK_SHARE``: the checks then cost at most
#     CHECK_SHARE (10%) of the evaluations, and a long loop is still checked
#     again and again, at other x; after a disagreement, every call. The
#     front door's remembered calls then check every ``SPOT_EVERY``-th call
#     (NOTE: [Repeated calls of one function]).
#: The share of a repeated evaluation's time its spaced checks may take.
CHECK_SHARE = 0.1


@dataclass
class Schedule:
    """When a repeated evaluation is next checked (NOTE: [Spaced checks of repeated ...])."""

    checks: int = 0
    check_seconds: float = 0.0
    unchecked_seconds: float = 0.0
    failed: bool = False
    forced: bool = False


def due(schedule: Schedule, seconds: float) -> bool:
    """Whether this call (its evaluation took ``seconds``) is checked; counts it otherwise.

    A check only asked for by ``every_call`` leaves the schedule as it was.
    """
    if schedule.checks == 0 or schedule.failed:
        return True
    schedule.unchecked_seconds += seconds
    if schedule.unchecked_seconds * CHECK_SHARE >= schedule.check_seconds:
        return True
    schedule.forced = every_call()
    return schedule.forced


def every_call() -> bool:
    """Whether repeated calls check every call (True unless :func:`checking` or
    ``JACPIPE_CHECK_EVERY_CALL=0`` spaces them: NOTE: [Spaced checks of repeated ...])."""
    chosen = _EVERY_CALL.get()
    if chosen is not None:
        return chosen
    return os.environ.get("JACPIPE_CHECK_EVERY_CALL", "1").strip().lower() not in (
        "0", "false", "no", "off")


def checked(schedule: Schedule, seconds: float, *, agreed: bool) -> None:
    """Record a check of ``seconds``; one that disagreed makes every later call checked."""
    schedule.failed = schedule.failed or not agreed
    if schedule.forced:
        schedule.forced = False
        return
    schedule.checks += 1
    schedule.check_seconds = seconds
    schedule.unchecked_seconds = 0.0


def vectorised() -> bool:
    """Whether the calls now running may vectorise (:func:`checking`)."""
    return _VECTORISE.get()


def spot_checks() -> bool:
    """Whether the calls now running compare vectorised rows with unbatched ones."""
    return _CHECK_VMAP.get() and _VECTORISE.get()


def report(message: str, category: type[Warning]) -> None:
    """One line: into the active log (once), else a warning."""
    log = _LOG.get()
    if log is None:
        warnings.warn(message, category, stacklevel=3)
    elif message not in log:
        log.append(message)


def pick(low: int, high: int, *key: int) -> int:
    """A random integer in ``[low, high)``, drawn from ``key`` (reproducible per call)."""
    return random.Random(hash(key)).randrange(low, high)


def uniform(shape: tuple[int, ...], like: Tensor, *key: int) -> Tensor:
    """Uniform ``[-1, 1)`` entries drawn on the CPU from ``key``, in ``like``'s dtype/device."""
    import torch

    g = torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF)
    out = torch.rand(shape, generator=g, dtype=torch.float32).mul_(2).sub_(1)
    return out.to(like.device, like.dtype)


def adjoint_gap(u: Tensor, Jv: Tensor, JTu: Tensor, v: Tensor) -> tuple[float, float, float]:
    """``(u . Jv, JTu . v, |difference| / Cauchy-Schwarz bound)`` in float64.

    The bound is ``max(|u| |Jv|, |JTu| |v|)``; the relative difference is NaN
    when a number is not finite, 0 when both are 0 at a zero bound.
    """
    u, Jv, JTu, v = (t.detach().reshape(-1).double() for t in (u, Jv, JTu, v))
    a, b = float(u @ Jv), float(JTu @ v)
    scale = max(float(u.norm() * Jv.norm()), float(JTu.norm() * v.norm()))
    if not all(math.isfinite(t) for t in (a, b, scale)):
        return a, b, float("nan")
    return a, b, abs(a - b) / scale if scale > 0 else (0.0 if a == b else float("inf"))


def tolerance(dtype: torch.dtype, table: dict[str, float] = ADJOINT_RTOL) -> float:
    """The tolerance of ``table`` for ``dtype`` (float32's for other dtypes)."""
    return table.get(str(dtype).removeprefix("torch."), table["float32"])


def disagreement(u: Tensor, Jv: Tensor, JTu: Tensor, v: Tensor, *,
                 out_dtype: torch.dtype | None = None) -> str | None:
    """One line when forward (``Jv``) and reverse (``JTu``) products disagree, else None.

    The tolerance is that of the less precise of ``v``'s dtype and ``fn``'s
    output dtype ``out_dtype``. Non-finite products cannot be compared: None
    (the run's check reports those).
    """
    a, b, rel = adjoint_gap(u, Jv, JTu, v)
    return verdict(a, b, rel, v.dtype, out_dtype)


def verdict(a: float, b: float, rel: float, dtype: torch.dtype,
            out_dtype: torch.dtype | None = None) -> str | None:
    """:func:`disagreement`'s line for ``u . (J v) = a``, ``(Jᵀ u) . v = b``, gap ``rel``."""
    tol = max(tolerance(dtype), tolerance(out_dtype or dtype))
    if not rel > tol:  # NaN: not comparable
        return None
    return (f"forward and reverse mode give different derivatives: u.(J v) = {a:.6g} by "
            f"forward mode, (J^T u).v = {b:.6g} by reverse mode (relative difference "
            f"{rel:.2g} > {tol:.2g}); fn holds something forward mode ignores (torch.no_grad, "
            "a tensor or module hook, a custom autograd.Function whose jvp disagrees with "
            "its backward)")


def row_mismatch(vectorised_row: Tensor, plain_row: Tensor, row: int | str,
                 scale: float | None = None) -> str | None:
    """One line when a vectorised row differs from the same row without vmap, else None.

    Also for random combinations of rows (``w @ rows`` against one unbatched
    pullback of ``w``): ``scale`` is then the Cauchy-Schwarz bound ``|w|
    |rows|``, else the larger of the two norms. Compared with
    :data:`SPOT_RTOL`; a non-finite plain row is not compared (None).
    """
    import torch

    dtype = vectorised_row.dtype  # the tolerance's: the rows' own precision
    a, b = vectorised_row.detach().reshape(-1).double(), plain_row.detach().reshape(-1).double()
    if not bool(torch.isfinite(b).all()):
        return None
    what = f"vectorised row {row}" if scale is None else f"a random combination of rows {row}"
    if scale is None:
        scale = max(float(a.norm()), float(b.norm()))
    diff = float((a - b).norm())
    tol = tolerance(dtype, SPOT_RTOL)
    if diff == diff and diff <= tol * scale:
        return None
    rel = diff / scale if scale > 0 else float("inf")
    return (f"{what} differs from the same without vmap (relative difference {rel:.2g} > "
            f"{tol:.2g}): a torch batching rule of an op in fn is wrong")


def spot_rows(count: int, *key: int) -> list[int]:
    """Up to :data:`SPOT_ROWS` of ``count`` rows, drawn at random from ``key``, sorted."""
    if count <= SPOT_ROWS:
        return list(range(count))
    return sorted(random.Random(hash(key)).sample(range(count), SPOT_ROWS))


def combination_mismatch(rows: Tensor, w: Tensor, plain: Tensor, first: int) -> str | None:
    """``w @ rows`` (vectorised) against ``plain`` (one unbatched pullback of ``w``).

    A random combination sees an error in any of the rows, not only in one
    picked row, for the same single backward pass.
    """
    rows, w = rows.detach(), w.detach().reshape(-1).to(rows.dtype)
    # in the rows' dtype: a copy of the chunk in float64 would cost more than the pullback
    scale = float(w.norm()) * float(rows.norm())
    return row_mismatch(w @ rows, plain, f"{first}+", scale)


def forward_rejected(check: Callable[[], str | None], what: str) -> bool:
    """Run a forward-mode check; report a disagreement; True: recompute by reverse mode.

    Under the ``warn`` policy forward mode's rows are kept (and reported);
    under ``fallback`` and ``reverse`` they are computed again by reverse mode.
    A check that cannot run (fn or its backward raises) keeps them silently;
    none runs where the run's own check covered this call (:func:`checking`).
    """
    if not _CHECK_FORWARD.get():
        return False
    try:
        reason = check()
    except Exception:  # noqa: BLE001 - a reverse pass that cannot run is not a verdict
        return False
    if reason is None:
        return False
    keep = forward_policy() == "warn"
    then = ("forward mode's rows kept (--method fwd); use reverse mode" if keep
            else "computed by reverse mode instead")
    report(f"{what}: {reason}; {then}", ForwardModeWarning)
    return not keep
