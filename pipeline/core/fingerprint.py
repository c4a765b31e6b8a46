"""Comparing two fingerprints of a job (a dict comparison; computing one is the problem layer's).

See :func:`pipeline.problem.fingerprint.fingerprint` for what a fingerprint holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.core.errors import JacpipeError

#: Relative tolerance of the fingerprint's probes, by dtype: two machines'
#: BLAS kernels differ in the last bits, a nondeterministic job by far more.
FINGERPRINT_RTOL = {"float32": 1e-4, "float64": 1e-9}


def check_fingerprint(expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    """Raise :class:`FingerprintMismatch` naming what differs between two fingerprints.

    Shapes, ``x`` and the source hashes are compared exactly, ``fn(x)`` and
    the derivative probe with :data:`FINGERPRINT_RTOL`; NaN matches NaN (and
    Inf the same Inf) at the same place. A source hash present on one side
    only is not compared (the other side was fingerprinted without ``spec``).

    Args:
        expected: the driver's (or the stored) fingerprint.
        got: the one just computed.

    Raises:
        FingerprintMismatch: with ``field`` one of ``"shapes"``, ``"x"``,
            ``"y"``, ``"operator"``, ``"parameters"`` (a module's layout or
            values, ``Problem.from_module``), ``"derivative"``, ``"source"``.
    """
    if expected.get("shapes") != got.get("shapes"):
        raise FingerprintMismatch(
            f"nondeterministic job: shapes differ (driver {expected.get('shapes')}, "
            f"worker {got.get('shapes')})",
            field="shapes",
        )
    if expected.get("x_sha256") != got.get("x_sha256"):
        raise FingerprintMismatch(
            "nondeterministic job: x differs between the driver and a worker "
            f"(sha256 {str(expected.get('x_sha256'))[:12]} vs {str(got.get('x_sha256'))[:12]}); "
            "seed every random draw in build() (torch.Generator().manual_seed(...))",
            field="x",
        )
    rtol = FINGERPRINT_RTOL.get(expected["shapes"]["dtype"], FINGERPRINT_RTOL["float32"])
    try:
        scale = max(abs(float(expected["y_norm"])), 1e-30)
        pairs = [(expected["y_norm"], got["y_norm"])] + list(
            zip(expected["y_probe"], got["y_probe"], strict=True)
        )
    except (KeyError, TypeError, ValueError):
        pairs, scale = [(None, 0)], 1.0  # a malformed or partial fingerprint
    same_count = expected.get("y_nonfinite", 0) == got.get("y_nonfinite", 0)
    for a, b in pairs:
        if not (same_count and _same_number(a, b, rtol=rtol, atol=rtol * scale)):
            raise FingerprintMismatch(
                "nondeterministic job: fn(x) differs between the driver and a worker "
                f"({a!r} vs {b!r}); seed every random draw in build() "
                "(weights, noise) so each worker builds the same function",
                field="y",
            )
    if expected.get("operator") != got.get("operator"):
        raise FingerprintMismatch(
            "the operator's options differ between the driver and a worker "
            f"({expected.get('operator')} vs {got.get('operator')}); build the same operator",
            field="operator",
        )
    if expected.get("parameters") != got.get("parameters"):
        raise FingerprintMismatch(
            "nondeterministic job: the module's parameters differ between the driver and a "
            "worker; seed the weights' initialisation (torch.manual_seed) in build()",
            field="parameters",
        )
    _check_derivative(expected.get("derivative"), got.get("derivative"), rtol)
    for key in ("code_sha256", "source_sha256"):
        a, b = expected.get(key), got.get(key)
        if a is not None and b is not None and a != b:
            what = "the job's source files" if key == "source_sha256" else "fn's code"
            raise FingerprintMismatch(
                f"job source changed: {what} differ between the driver and a worker "
                f"(sha256 {a[:12]} vs {b[:12]}); run the same code everywhere",
                field="source",
            )


class FingerprintMismatch(JacpipeError):
    """Two fingerprints of one job differ (:func:`check_fingerprint`).

    Args:
        message: one line saying what differs and the fix.
        field: what differs: ``"shapes"``, ``"x"``, ``"y"`` (``fn(x)``),
            ``"derivative"`` (the probe ``u . (J v)``) or ``"source"`` (the
            job's files or ``fn``'s code). A resume names it as "the job
            changed since these shards were written".
    """

    def __init__(self, message: str, field: str = "fingerprint") -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:  # Ray ships it from a worker: keep the field
        return (type(self), (str(self), self.field))


def _check_derivative(expected: Any, got: Any, rtol: float) -> None:
    """Compare two derivative probes (see NOTE: [The derivative probe])."""
    if not isinstance(expected, Mapping) or not isinstance(got, Mapping):
        raise FingerprintMismatch(
            "the fingerprint has no derivative probe on one side (written by an older "
            "jacpipe?); recompute the result",
            field="derivative",
        )
    if "error" in expected or "error" in got:
        if expected.get("error") != got.get("error"):
            raise FingerprintMismatch(
                "nondeterministic job: reverse mode differentiates fn on one side only "
                f"({expected.get('error') or 'ok'} vs {got.get('error') or 'ok'})",
                field="derivative",
            )
        return
    a, b = expected.get("uJv"), got.get("uJv")
    scale = max(_float(expected.get("scale", 0.0)), _float(got.get("scale", 0.0)))
    if expected.get("nonfinite") != got.get("nonfinite") or not _same_number(
        a, b, rtol=rtol, atol=rtol * scale
    ):
        raise FingerprintMismatch(
            "nondeterministic job: the derivative of fn differs between the driver and a "
            f"worker (probe u.(J v) = {a!r} vs {b!r}, scale {scale:.3g}) although fn(x) "
            "agrees; seed every random draw in build() (weights, noise) and keep custom "
            "backward functions unchanged",
            field="derivative",
        )


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _same_number(a: Any, b: Any, *, rtol: float, atol: float) -> bool:
    """``math.isclose`` where NaN equals NaN and Inf the same Inf (values may be strings)."""
    import math

    if a is None or b is None:
        return False
    fa, fb = _float(a), _float(b)
    if math.isnan(fa) or math.isnan(fb):
        return math.isnan(fa) and math.isnan(fb)
    if math.isinf(fa) or math.isinf(fb):
        return fa == fb
    return math.isclose(fa, fb, rel_tol=rtol, abs_tol=atol)
