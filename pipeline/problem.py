"""Jobs: the :class:`Problem` they build, how they are loaded, and their fingerprint.

A job is a module exposing ``build(**params) -> Problem``. Built-in jobs live
in the top-level ``jobs`` package (``jacpipe run mlp``); any importable
``module:function`` works too (``jacpipe run my.module:build``).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pipeline.errors import JacpipeError, first_line

#: What is differentiated: see :mod:`pipeline.kinds` for what each one means.
Kind = Literal["jacobian", "hessian", "batched"]
KINDS: tuple[str, ...] = get_args(Kind)


@dataclass(frozen=True)
class Problem:
    """A differentiable function and the point at which to differentiate it.

    Args:
        fn: ``R^in_shape -> R^out_shape``. For ``kind="batched"`` it maps one
            sample; for ``kind="hessian"`` it returns a scalar.
        x: the point (``kind="batched"``: a batch ``(B, *in_shape)`` of points).
        kind: ``"jacobian"``, ``"hessian"`` or ``"batched"``.
        sparsity: optional known pattern (a ``scipy.sparse`` matrix of shape
            ``(m, n)``) of the Jacobian or Hessian; enables colouring.
    """

    fn: Callable[..., Any]
    x: Any
    kind: Kind = "jacobian"
    sparsity: Any = None


@dataclass(frozen=True)
class Shapes:
    """Shapes and sizes of a problem's derivative.

    Rows are indexed over ``fn(x).reshape(-1)`` (hessian: over ``x.reshape(-1)``;
    batched: over ``(sample, row)`` as ``sample * m + row``), columns over
    ``x.reshape(-1)`` (batched: one sample).
    """

    kind: Kind
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    batch: int | None
    dtype: str

    @property
    def m(self) -> int:
        """Rows per sample."""
        return _numel(self.out_shape)

    @property
    def n(self) -> int:
        """Columns."""
        return _numel(self.in_shape)

    @property
    def total_rows(self) -> int:
        """Rows over the whole result (batched: ``B * m``)."""
        return self.m * (self.batch or 1)

    @property
    def itemsize(self) -> int:
        """Bytes of one entry (4 for float32, 8 for float64)."""
        return 4 if self.dtype == "float32" else 8

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "batch": self.batch,
            "dtype": self.dtype,
            "m": self.m,
            "n": self.n,
            "total_rows": self.total_rows,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Shapes:
        return cls(
            kind=d["kind"],
            in_shape=tuple(d["in_shape"]),
            out_shape=tuple(d["out_shape"]),
            batch=d.get("batch"),
            dtype=d["dtype"],
        )


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


# ---------------------------------------------------------------------------
# Loading jobs
# ---------------------------------------------------------------------------


def builtin_jobs() -> list[str]:
    """Names of the built-in jobs (modules of the ``jobs`` package)."""
    import jobs

    return sorted(
        m.name for m in pkgutil.iter_modules(jobs.__path__) if not m.name.startswith("_")
    )


#: ``package.module:function``: dotted Python identifiers, nothing else (no paths).
_SPEC = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def split_spec(spec: str) -> tuple[str, str]:
    """``(module, function)`` of a job spec, validated before anything is imported.

    Args:
        spec: a built-in job name (``"mlp"``) or ``"package.module:function"``.

    Raises:
        JacpipeError: an unknown built-in name, or a spec that is not dotted
            module names and a function name (``../x:build``, ``.hidden:build``).
    """
    if ":" not in spec:
        if spec not in builtin_jobs():
            raise JacpipeError(
                f"unknown job {spec!r}: expected one of {', '.join(builtin_jobs())} "
                "or 'package.module:function' (see `jacpipe jobs`)"
            )
        return f"jobs.{spec}", "build"
    if not _SPEC.match(spec):
        raise JacpipeError(
            f"job {spec!r}: expected 'package.module:function' with dotted Python names "
            "(a module on PYTHONPATH or in the current directory, not a file path)"
        )
    mod_name, _, fn_name = spec.partition(":")
    return mod_name, fn_name


def resolve_builder(spec: str) -> Callable[..., Problem]:
    """Find the ``build`` function named by ``spec``.

    Args:
        spec: a built-in job name (``"mlp"``) or ``"package.module:function"``.

    Raises:
        JacpipeError: the job or function does not exist, or its module fails
            to import (a syntax error, an exception at import): one line, exit 2.
    """
    mod_name, fn_name = split_spec(spec)
    # A user's module in the current directory, as `python -m` would find it
    # (the console script's sys.path starts with its own bin/ folder); Ray
    # workers get the driver's working directory on their path too.
    import os
    import sys

    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as exc:
        raise JacpipeError(
            f"job {spec!r}: cannot import module {mod_name!r} ({exc}); "
            "is it on PYTHONPATH or in the current directory?"
        ) from None
    except SyntaxError as exc:
        raise JacpipeError(
            f"job {spec!r}: module {mod_name!r} has a syntax error "
            f"({exc.msg}, {os.path.basename(exc.filename or '?')} line {exc.lineno})"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a user's module raised at import: one line
        raise JacpipeError(
            f"job {spec!r}: importing module {mod_name!r} raised {type(exc).__name__}: "
            f"{first_line(exc)}"
        ) from None
    builder = getattr(module, fn_name, None)
    if not callable(builder):
        raise JacpipeError(f"job {spec!r}: module {mod_name!r} has no function {fn_name!r}")
    return builder


def job_parameters(builder: Callable[..., Problem]) -> dict[str, Any]:
    """The keyword parameters of a ``build`` function and their defaults."""
    params: dict[str, Any] = {}
    for name, p in inspect.signature(builder).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        params[name] = None if p.default is inspect.Parameter.empty else p.default
    return params


def job_doc(builder: Callable[..., Problem]) -> str:
    """First line of the job module's (or builder's) docstring."""
    module = inspect.getmodule(builder)
    doc = (module.__doc__ if module is not None else None) or builder.__doc__ or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def parse_params(builder: Callable[..., Problem], pairs: list[str]) -> dict[str, Any]:
    """Turn ``["n=4000", "act=tanh"]`` into typed keyword arguments.

    Each value is converted to the type of the parameter's default (int,
    float, bool or str); a parameter without a default takes JSON or a string.

    Raises:
        JacpipeError: a malformed pair, an unknown name, or a badly typed value.
    """
    known = job_parameters(builder)
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise JacpipeError(f"parameter {pair!r}: expected NAME=VALUE, e.g. -p n=4000")
        if name in out:
            raise JacpipeError(f"parameter {name!r} given twice (-p {name}=...)")
        if name not in known:
            choices = ", ".join(known) or "none"
            raise JacpipeError(f"unknown parameter {name!r}: this job takes {choices}")
        out[name] = _convert(name, raw.strip(), known[name])
    return out


def _convert(name: str, raw: str, default: Any) -> Any:
    expected = type(default)
    try:
        if isinstance(default, bool):
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, str):
            return raw
        if default is None:
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                return raw
        return expected(raw)
    except ValueError:
        raise JacpipeError(
            f"parameter {name!r}: expected {expected.__name__}, got {raw!r}"
        ) from None


def build_problem(spec: str, params: Mapping[str, Any]) -> Problem:
    """Build and validate the problem of job ``spec`` with typed ``params``.

    Raises:
        JacpipeError: the build fails, or returns something jacpipe can't use.
    """
    builder = resolve_builder(spec)
    try:
        problem = builder(**params)
    except JacpipeError:
        raise
    except TypeError as exc:
        raise JacpipeError(f"job {spec!r}: build() rejected parameters: {exc}") from None
    except Exception as exc:  # a user's builder: report it in one line
        raise JacpipeError(f"job {spec!r}: build() raised {type(exc).__name__}: {exc}") from None
    validate(problem, spec)
    return problem


def rebuild(spec: str, params: Mapping[str, Any], expected: Mapping[str, Any]) -> Problem:
    """Build job ``spec`` again and check it against the fingerprint ``expected``.

    The one place where a worker, ``compare`` or ``inspect`` gets back the
    problem a run was computed for: a different build is an error, never a
    silently different result.

    Raises:
        JacpipeError: the build fails or its fingerprint differs.
    """
    problem = build_problem(spec, params)
    check_fingerprint(expected, fingerprint(problem, validate(problem, spec)))
    return problem


def validate(problem: Problem, spec: str = "job") -> Shapes:
    """Check a problem and return its :class:`Shapes`.

    Raises:
        JacpipeError: wrong types, an integer input, a non-floating or
            non-tensor output, an unknown kind.
    """
    x = _checked_input(problem, spec)
    sample = x[0] if problem.kind == "batched" else x
    y = _checked_output(problem, spec, sample)
    if problem.kind == "hessian":
        if y.numel() != 1:
            raise JacpipeError(
                f"{spec}: hessian kind needs a scalar fn(x), got shape {tuple(y.shape)}"
            )
        out_shape = tuple(x.shape)
    else:
        out_shape = tuple(y.shape)
    shapes = Shapes(
        kind=problem.kind,
        in_shape=tuple(sample.shape),
        out_shape=out_shape,
        batch=int(x.shape[0]) if problem.kind == "batched" else None,
        dtype=str(x.dtype).removeprefix("torch."),
    )
    if shapes.n == 0 or shapes.total_rows == 0:
        raise JacpipeError(f"{spec}: empty problem (shape {shapes.to_json()})")
    if problem.sparsity is not None and not isinstance(problem.sparsity, str):
        sp_shape = tuple(getattr(problem.sparsity, "shape", ()))
        if sp_shape != (shapes.m, shapes.n):
            raise JacpipeError(
                f"{spec}: sparsity pattern has shape {sp_shape}, expected {(shapes.m, shapes.n)}"
            )
    return shapes


def _checked_input(problem: Problem, spec: str) -> Any:
    """``problem.x`` after checking the problem's type, kind and input dtype."""
    import torch

    if not isinstance(problem, Problem):
        raise JacpipeError(
            f"{spec}: build() must return pipeline.Problem, got {type(problem).__name__}"
        )
    if problem.kind not in KINDS:
        raise JacpipeError(f"{spec}: kind must be one of {KINDS}, got {problem.kind!r}")
    x = problem.x
    if not isinstance(x, torch.Tensor):
        raise JacpipeError(f"{spec}: x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise JacpipeError(
            f"{spec}: x has dtype {x.dtype}; Jacobians need a floating input "
            "(float32 or float64). Convert it, e.g. x.double()"
        )
    if x.dtype not in (torch.float32, torch.float64):
        raise JacpipeError(f"{spec}: x has dtype {x.dtype}; expected float32 or float64")
    if problem.kind == "batched" and x.dim() < 1:
        raise JacpipeError(f"{spec}: batched kind needs x of shape (B, *in_shape)")
    return x


def _checked_output(problem: Problem, spec: str, sample: Any) -> Any:
    """``fn(sample)`` after checking it is a floating tensor of the input's dtype."""
    import torch

    try:
        with torch.no_grad():
            y = problem.fn(sample)
    except Exception as exc:
        raise JacpipeError(f"{spec}: fn(x) raised {type(exc).__name__}: {exc}") from None
    if not isinstance(y, torch.Tensor):
        raise JacpipeError(f"{spec}: fn(x) must return a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise JacpipeError(
            f"{spec}: fn(x) returned dtype {y.dtype}; a Jacobian needs a floating output"
        )
    if y.dtype != sample.dtype:
        raise JacpipeError(
            f"{spec}: fn(x) returned {y.dtype} for an input of {sample.dtype}; keep one dtype"
        )
    return y


# ---------------------------------------------------------------------------
# Fingerprint: every worker must rebuild the same problem
# ---------------------------------------------------------------------------

_PROBE = 64  # number of output entries compared with a tolerance


def fingerprint(problem: Problem, shapes: Shapes) -> dict[str, Any]:
    """Facts that identify a built problem, checked on every worker.

    ``x`` is hashed exactly (it comes from a seed). ``fn(x)`` is compared
    through a probe of evenly spaced entries with a tolerance, because two
    machines with different BLAS kernels may differ in the last bits while
    a nondeterministic job differs by far more.
    """
    import torch

    x = problem.x.detach().cpu().contiguous()
    with torch.no_grad():
        if problem.kind == "batched":
            k = min(int(x.shape[0]), 8)
            y = torch.stack([problem.fn(x[i]) for i in range(k)])
        else:
            y = problem.fn(x)
    y = y.detach().cpu().reshape(-1).double()
    idx = torch.linspace(0, y.numel() - 1, min(_PROBE, y.numel())).round().long()
    return {
        "shapes": shapes.to_json(),
        "x_sha256": hashlib.sha256(x.numpy().tobytes()).hexdigest(),
        "y_probe": [float(v) for v in y[idx]],
        "y_norm": float(y.norm()),
    }


def check_fingerprint(expected: Mapping[str, Any], got: Mapping[str, Any]) -> None:
    """Raise a :class:`JacpipeError` naming what differs between two fingerprints."""
    import math

    if expected["shapes"] != got["shapes"]:
        raise JacpipeError(
            f"nondeterministic job: shapes differ (driver {expected['shapes']}, "
            f"worker {got['shapes']})"
        )
    if expected["x_sha256"] != got["x_sha256"]:
        raise JacpipeError(
            "nondeterministic job: x differs between the driver and a worker "
            f"(sha256 {expected['x_sha256'][:12]} vs {got['x_sha256'][:12]}); "
            "seed every random draw in build() (torch.Generator().manual_seed(...))"
        )
    rtol = 1e-4 if expected["shapes"]["dtype"] == "float32" else 1e-9
    scale = max(abs(expected["y_norm"]), 1e-30)
    pairs = [(expected["y_norm"], got["y_norm"])] + list(
        zip(expected["y_probe"], got["y_probe"], strict=True)
    )
    for a, b in pairs:
        if not (math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * scale)):
            raise JacpipeError(
                "nondeterministic job: fn(x) differs between the driver and a worker "
                f"({a!r} vs {b!r}); seed every random draw in build() "
                "(weights, noise) so each worker builds the same function"
            )
