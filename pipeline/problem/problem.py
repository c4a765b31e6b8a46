"""Jobs: the :class:`Problem` they build, how they are loaded, and their fingerprint.

A job is a module exposing ``build(**params) -> Problem``. Built-in jobs live
in the top-level ``jobs`` package (``jacpipe run mlp``); any importable
``module:function`` works too (``jacpipe run my.module:build``).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import inspect
import json
import pkgutil
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import JacpipeError, first_line
from pipeline.core.fingerprint import check_fingerprint
from pipeline.core.kinds import KIND_NAMES as KINDS
from pipeline.core.kinds import KINDS as KIND_TABLE
from pipeline.core.kinds import Kind, kind_of
from pipeline.core.shapes import Shapes


@dataclass(frozen=True)
class Problem:
    """A differentiable function and the point at which to differentiate it.

    Args:
        fn: ``R^in_shape -> R^out_shape``. For ``kind="batched"`` and the
            per-point kinds it maps one sample (point); for ``kind="hessian"``
            and ``kind="third"`` it returns a scalar.
        x: the point (``kind="batched"``: a batch ``(B, *in_shape)`` of points;
            per-point kinds ``laplacian``, ``biharmonic``, ``taylor``: points
            ``(P, D)``).
        kind: one of :data:`pipeline.core.kinds.KINDS` (``"jacobian"``,
            ``"hessian"``, ``"batched"``, ``"laplacian"``, ``"biharmonic"``,
            ``"taylor"``, ``"third"``).
        sparsity: optional known pattern (a ``scipy.sparse`` matrix of shape
            ``(m, n)``), or ``"auto"`` to detect it by tracing ``fn``
            (:func:`pipeline.detect_sparsity`; ``"auto-local"``: at this x
            only). A pattern enables colouring.
        operator: the per-point operator's options, JSON values only:
            ``samples`` (an int: a stochastic estimate from that many random
            directions, with a standard error) and ``seed`` for ``laplacian``
            and ``biharmonic``; ``weights`` (``D`` numbers: ``tr(diag(w) H)``,
            or a ``D x D`` nested list ``C``: ``tr(C H)``) for ``laplacian``;
            ``order`` (K >= 1) and ``direction`` (``D`` numbers) for ``taylor``.
    """

    fn: Callable[..., Any]
    x: Any
    kind: Kind = "jacobian"
    sparsity: Any = None
    operator: Mapping[str, Any] | None = None

    @classmethod
    def from_module(cls, model: Any, inputs: Any, *, wrt: str = "parameters") -> Problem:
        """Per-sample Jacobians of a network, with respect to its parameters or its inputs.

        ``wrt="parameters"``: kind ``params``, rows ``(sample, output)`` and
        columns the flattened parameters (those with ``requires_grad``, in
        ``named_parameters()`` order; the fingerprint, so the manifest, names
        each with its shape and offset). ``wrt="inputs"``: kind ``batched``.
        The model maps a batch ``(B, *in_shape)`` to ``(B, *out_shape)``; the
        problem holds a snapshot of its parameters and buffers
        (:class:`pipeline.problem.module.ModuleFunction`).

        Raises:
            JacpipeError: ``wrt`` unknown, batch norm or dropout in training
                mode (call ``model.eval()``), no trainable parameter, or
                parameters of another dtype than ``inputs``.
        """
        from pipeline.problem.module import ModuleFunction

        if wrt not in ("parameters", "inputs"):
            raise JacpipeError(f"from_module: wrt must be 'parameters' or 'inputs', got {wrt!r}")
        fn = ModuleFunction.of(model, getattr(inputs, "dtype", None))
        return cls(fn, inputs, kind="params" if wrt == "parameters" else "batched")


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


def did_you_mean(spec: str) -> str | None:
    """The job spec a user probably meant by ``spec``, or None.

    A file path (``examples/my_job.py``, with or without ``:function``) becomes
    its module's spec (``examples.my_job:build``); a dotted module without a
    function gets ``:build``; a name close to a built-in job (``mpl``) gets it.

    Args:
        spec: what the user gave as JOB.
    """
    module, sep, fn = spec.rpartition(":")
    if not sep:
        module, fn = spec, "build"
    fn = fn or "build"
    path = module.replace("\\", "/")
    if "/" in path or path.endswith(".py"):
        path = path.removeprefix("./").removesuffix(".py").strip("/")
        if path in builtin_jobs() and fn == "build":
            return path  # mlp.py: the built-in job
        candidate = f"{path.replace('/', '.')}:{fn}"
        return candidate if _SPEC.match(candidate) else None
    if ":" not in spec and "." in spec:
        candidate = f"{spec}:build"
        return candidate if _SPEC.match(candidate) else None
    if ":" not in spec:
        close = difflib.get_close_matches(spec, builtin_jobs(), n=1, cutoff=0.6)
        return close[0] if close else None
    return None


def _hint(spec: str) -> str:
    """``"did you mean 'x'? "`` for :func:`did_you_mean`'s suggestion, else ``""``."""
    guess = did_you_mean(spec)
    return f"did you mean {guess!r}? " if guess else ""


def split_spec(spec: str) -> tuple[str, str]:
    """``(module, function)`` of a job spec, validated before anything is imported.

    Args:
        spec: a built-in job name (``"mlp"``) or ``"package.module:function"``.

    Raises:
        JacpipeError: an unknown built-in name, or a spec that is not dotted
            module names and a function name (``../x:build``, ``.hidden:build``);
            the line suggests the likely spec (:func:`did_you_mean`).
    """
    if ":" not in spec:
        if spec not in builtin_jobs():
            raise JacpipeError(
                f"unknown job {spec!r}: {_hint(spec)}expected one of "
                f"{', '.join(builtin_jobs())} or 'package.module:function' (see `jacpipe jobs`)"
            )
        return f"jobs.{spec}", "build"
    if not _SPEC.match(spec):
        raise JacpipeError(
            f"job {spec!r}: {_hint(spec)}expected 'package.module:function' with dotted "
            "Python names (a module on PYTHONPATH or in the current directory, not a file path)"
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
        names = [n for n in vars(module) if not n.startswith("_") and callable(vars(module)[n])]
        close = difflib.get_close_matches(fn_name, names, n=1, cutoff=0.6)
        hint = f"; did you mean '{mod_name}:{close[0]}'?" if close else ""
        raise JacpipeError(
            f"job {spec!r}: module {mod_name!r} has no function {fn_name!r}{hint}")
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


def static_parameters(spec: str) -> dict[str, Any] | None:
    """A job's parameters and defaults read from its source, the module not imported.

    NOTE: [Parameters without imports]
        A job module imports torch (1.7 s); ``jacpipe run --executor ray``
        starts Ray while the job is built and checked in a thread, but a
        typo in a job or parameter name must still cost a second, not a
        Ray start. The ``build`` function's signature is read from the
        module's source instead: a plain top-level ``def`` whose defaults
        are literals. Anything else (a decorated, assigned or generated
        builder, a default such as ``torch.float32``, a module that is not
        a ``.py`` file) is None: the caller imports the module as before.
        The thread's real import checks the same pairs again.

    Args:
        spec: a built-in job name or ``"package.module:function"``.

    Raises:
        JacpipeError: an unknown built-in job or a malformed spec (:func:`split_spec`).
    """
    import ast
    import importlib.util
    import os
    import sys

    mod_name, fn_name = split_spec(spec)
    if os.getcwd() not in sys.path:  # where resolve_builder would look too
        sys.path.append(os.getcwd())
    try:
        found = importlib.util.find_spec(mod_name)
        origin = found.origin if found is not None else None
        if not origin or not origin.endswith(".py"):
            return None
        with open(origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except Exception:  # noqa: BLE001 - any doubt: the caller imports and says what is wrong
        return None
    defs = [node for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                 ast.Assign, ast.AnnAssign, ast.Import, ast.ImportFrom))
            and fn_name in _bound_names(node)]
    if len(defs) != 1 or not isinstance(defs[0], ast.FunctionDef) or defs[0].decorator_list:
        return None
    args = defs[0].args
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults))
    defaults += list(args.defaults)
    pairs = [*zip(positional, defaults, strict=True),
             *zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    params: dict[str, Any] = {}
    for arg, default in pairs:
        try:
            params[arg.arg] = None if default is None else ast.literal_eval(default)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
    return params


def _bound_names(node: Any) -> set[str]:
    """The top-level names a module statement binds."""
    import ast

    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def parse_params(builder: Callable[..., Problem] | dict[str, Any], pairs: list[str]
                 ) -> dict[str, Any]:
    """Turn ``["n=4000", "act=tanh"]`` into typed keyword arguments.

    Each value is converted to the type of the parameter's default (int,
    float, bool or str); a parameter without a default takes JSON or a string.

    Args:
        builder: the job's ``build`` function, or its parameters and defaults
            (:func:`job_parameters`, :func:`static_parameters`).

    Raises:
        JacpipeError: a malformed pair, an unknown name, or a badly typed value.
    """
    known = builder if isinstance(builder, dict) else job_parameters(builder)
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
    except SystemExit as exc:  # sys.exit() in a builder must not end jacpipe silently
        raise JacpipeError(
            f"job {spec!r}: build() exited (sys.exit({exc.code!r})) instead of returning a "
            "pipeline.Problem; raise an exception with a message in build() instead"
        ) from None
    validate(problem, spec)
    return problem


def rebuild(spec: str, params: Mapping[str, Any], expected: Mapping[str, Any]) -> Problem:
    """Build job ``spec`` again and check it against the fingerprint ``expected``.

    The one place where a worker, ``compare`` or ``inspect`` gets back the
    problem a run was computed for: a different build is an error, never a
    silently different result.

    The fingerprint's kind wins over the job's own (``jacpipe run JOB --kind K``).

    Raises:
        JacpipeError: the build fails or its fingerprint differs.
    """
    problem = with_kind(build_problem(spec, params), (expected.get("shapes") or {}).get("kind"))
    check_fingerprint(expected, fingerprint(problem, validate(problem, spec), spec=spec))
    return problem


def with_kind(problem: Problem, kind: str | None) -> Problem:
    """``problem`` with another kind (``--kind``), or itself when ``kind`` is None or the same."""
    import dataclasses

    if kind is None or kind == problem.kind:
        return problem
    return dataclasses.replace(problem, kind=kind)


def validate(problem: Problem, spec: str = "job") -> Shapes:
    """Check a problem and return its :class:`Shapes`.

    Raises:
        JacpipeError: wrong types, an integer input, a non-floating or
            non-tensor output, an unknown kind.
    """
    x = _checked_input(problem, spec)
    kind = kind_of(problem.kind)
    sample = x[0] if kind.per_sample else x
    y = _checked_output(problem, spec, sample)
    if kind.scalar_fn and y.numel() != 1:
        raise JacpipeError(
            f"{spec}: {problem.kind} kind needs a scalar fn(x), got shape {tuple(y.shape)}; "
            "return a single number (e.g. an energy, or fn(x).sum())"
        )
    check_operator(problem, int(sample.numel()), spec)
    in_shape = tuple(sample.shape)
    if kind.columns_over == "parameters":
        from pipeline.problem.module import parameter_columns

        in_shape = (parameter_columns(problem.fn, spec),)
    shapes = Shapes(
        kind=problem.kind,
        in_shape=in_shape,
        out_shape=kind.out_shape(tuple(sample.shape), tuple(y.shape)),
        batch=int(x.shape[0]) if kind.per_sample else None,
        dtype=str(x.dtype).removeprefix("torch."),
    )
    if shapes.n == 0 or shapes.total_rows == 0:
        raise JacpipeError(f"{spec}: empty problem (shape {shapes.to_json()})")
    if isinstance(problem.sparsity, str) and problem.sparsity not in ("auto", "auto-local"):
        raise JacpipeError(
            f"{spec}: sparsity must be a scipy.sparse pattern, 'auto' (detected, valid at any "
            f"x) or 'auto-local' (at this x only), got {problem.sparsity!r}"
        )
    if problem.sparsity is not None and kind.hessian_pattern:
        _check_hessian_pattern(problem.sparsity, int(sample.numel()), spec)
    elif problem.sparsity is not None and not kind.sparse_ok:
        sparse = ", ".join(k for k, s in KIND_TABLE.items() if s.sparse_ok)
        raise JacpipeError(f"{spec}: sparsity patterns apply to the {sparse} kinds, not "
                           f"{problem.kind!r}; leave Problem.sparsity None")
    if (problem.sparsity is not None and not isinstance(problem.sparsity, str)
            and kind.sparse_ok):
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
    if kind_of(problem.kind).per_point and x.dim() != 2:
        raise JacpipeError(
            f"{spec}: {problem.kind} kind needs points x of shape (P, D), got shape "
            f"{tuple(x.shape)}; stack the points as rows (x.reshape(P, -1))"
        )
    if kind_of(problem.kind).per_sample and x.dim() < 1:
        raise JacpipeError(f"{spec}: batched kind needs x of shape (B, *in_shape)")
    return x


def _check_hessian_pattern(pattern: Any, n: int, spec: str) -> None:
    """A third-derivative problem's sparsity: the Hessian's ``n x n`` pattern, or ``"auto"``."""
    if isinstance(pattern, str):
        if pattern != "auto":
            raise JacpipeError(f"{spec}: kind 'third' takes sparsity 'auto' (the Hessian's "
                               f"pattern, detected) or an n x n pattern, got {pattern!r}")
        return
    shape = tuple(getattr(pattern, "shape", ()))
    if shape != (n, n):
        raise JacpipeError(f"{spec}: kind 'third' takes the Hessian's sparsity pattern, shape "
                           f"({n}, {n}), got {shape}")


def check_operator(problem: Problem, d: int, spec: str = "job") -> None:
    """Refuse operator options the kind does not take, or of the wrong type or size.

    Args:
        problem: the problem (``problem.operator`` is checked against its kind).
        d: the size of one point (``D``).
        spec: the job, for the message.

    Raises:
        JacpipeError: one line naming the option, what arrived and what is allowed.
    """
    kind = kind_of(problem.kind)
    options = dict(problem.operator or {})
    unknown = sorted(set(options) - set(kind.operator))
    if unknown:
        allowed = ", ".join(kind.operator) or "none"
        what = ("samples needs a stochastic operator (kind laplacian or biharmonic)"
                if "samples" in unknown else f"unknown option(s) {', '.join(unknown)}")
        raise JacpipeError(f"{spec}: operator option for kind {problem.kind!r}: {what}; "
                           f"it takes {allowed}")
    _check_int(options, "samples", 2, spec)
    _check_int(options, "seed", 0, spec)
    _check_int(options, "order", 1, spec)
    if "order" in kind.operator and ("order" not in options or "direction" not in options):
        raise JacpipeError(f"{spec}: kind 'taylor' needs operator options order (K >= 1) "
                           f"and direction ({d} numbers), got {sorted(options)}")
    _check_numbers(options, "direction", [(d,)], spec)
    _check_numbers(options, "weights", [(d,), (d, d)], spec)


def _check_int(options: Mapping[str, Any], name: str, low: int, spec: str) -> None:
    value = options.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or value < low):
        raise JacpipeError(f"{spec}: operator option {name} must be an integer >= {low}, "
                           f"got {value!r}")


def _check_numbers(options: Mapping[str, Any], name: str, shapes: list[tuple[int, ...]],
                   spec: str) -> None:
    if name not in options:
        return
    import numpy as np

    try:
        arr = np.asarray(options[name], dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.shape not in shapes or not np.isfinite(arr).all():
        got = "not numbers" if arr is None else f"shape {arr.shape}"
        want = " or ".join(str(s) for s in shapes)
        raise JacpipeError(f"{spec}: operator option {name} must be finite numbers of shape "
                           f"{want} (one per coordinate of a point), got {got}")


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
_PROBE_SAMPLES = 8  # batched kind: samples evaluated by the fingerprint
_PROBE_SEED = 0  # seed of the derivative probe's u and v


def fingerprint(problem: Problem, shapes: Shapes, *, spec: str | None = None) -> dict[str, Any]:
    """Facts that identify a built problem, checked on every worker and on resume.

    ``x`` is hashed exactly (it comes from a seed). ``fn(x)`` is compared
    through a probe of evenly spaced entries with a tolerance, because two
    machines with different BLAS kernels may differ in the last bits while
    a nondeterministic job differs by far more.

    NOTE: [The derivative probe]
        ``fn(x)`` alone misses a job whose derivative changed while its value
        did not: unseeded weights where ``fn(x)`` does not depend on them
        (``tanh(w @ x)`` at ``x = 0``), or a custom ``backward`` edited
        between two runs. The probe is ``(Jᵀ u) . v`` (Hessians:
        ``u . (H v)``; batched: over the first 8 samples) with seeded ``u``,
        ``v``, by plain ``torch.autograd`` (reverse mode, so every function
        autograd differentiates has one), compared relative to its
        Cauchy-Schwarz bound. It costs one forward + backward pass per
        fingerprint, so the user's backward code runs once more in each
        worker: an exception it raises there (not autograd's own
        ``RuntimeError``, which is recorded) propagates from here. NaN / Inf
        entries of ``fn(x)`` or of ``Jᵀ u`` are counted and left out of the
        sums, so a job with NaN at ``x`` matches itself.

    Args:
        problem: the built problem.
        shapes: its :class:`Shapes` (from :func:`validate`).
        spec: the job spec it was built from (``"mlp"``, ``"pkg.mod:build"``):
            its source files are hashed into ``source_sha256``. Pass the same
            on the driver and on the workers; without it only ``fn``'s code
            object is hashed (``code_sha256``, always present).

    Returns:
        A JSON-serialisable dict (non-finite floats written as strings):
        ``shapes``, ``x_sha256``, ``y_probe``, ``y_norm``, ``y_nonfinite``,
        ``derivative``, ``code_sha256``, ``source_sha256``.

    Raises:
        Exception: whatever ``fn`` (or its custom backward) raises, except
            autograd's own ``RuntimeError`` in the derivative probe.
    """
    import torch

    x_cpu = problem.x.detach().cpu().contiguous()
    x_sha = hashlib.sha256(x_cpu.numpy().tobytes()).hexdigest()
    x = problem.x.detach().clone()  # fn never sees the problem's own x
    with torch.no_grad():
        if kind_of(problem.kind).per_sample:
            y = _stacked_samples(problem.fn, x[: min(int(x.shape[0]), _PROBE_SAMPLES)])
        else:
            y = problem.fn(x)
    y = y.detach().cpu().reshape(-1).double()
    idx = torch.linspace(0, y.numel() - 1, min(_PROBE, y.numel())).round().long()
    finite = torch.isfinite(y)
    return {
        "shapes": shapes.to_json(),
        "x_sha256": x_sha,
        "y_probe": [_json_float(float(v)) for v in y[idx]],
        "y_norm": float(y[finite].norm()),
        "y_nonfinite": int((~finite).sum()),
        "derivative": _derivative_probe(problem),
        "operator": _operator_json(problem.operator),
        "parameters": _parameters_json(problem.fn),
        "code_sha256": code_sha256(problem.fn),
        "source_sha256": source_sha256(spec) if spec else None,
    }


def _stacked_samples(fn: Callable[[Any], Any], xs: Any) -> Any:
    """``fn`` of each sample, stacked; another output shape is a :class:`SampleShapeError`.

    The fingerprint (and its derivative probe) stack the first samples'
    outputs: a per-sample function whose output size depends on the sample
    is refused here with the engine's message, not torch.stack's.
    """
    import torch

    from pipeline.core.errors import SampleShapeError

    ys = [fn(xs[i]) for i in range(xs.shape[0])]
    for i, y in enumerate(ys[1:], start=1):
        if y.shape != ys[0].shape:
            raise SampleShapeError(
                f"fn(xs[{i}]) has {y.numel()} entries (shape {tuple(y.shape)}) but fn(xs[0]) "
                f"has {ys[0].numel()} (shape {tuple(ys[0].shape)}): a batched job's fn must "
                "give every sample an output of the same shape (pad it, or use one job per size)")
    return torch.stack(ys)


def _derivative_probe(problem: Problem) -> dict[str, Any]:
    """``(Jᵀ u) . v`` (Hessian: ``u . (H v)``) at ``x`` by ``torch.autograd``, seeded."""
    import torch

    from pipeline.core.imports import spare_sympy_import

    spare_sympy_import()  # NOTE: [backward without sympy]
    x = problem.x.detach()
    if kind_of(problem.kind).per_sample:
        x = x[: min(int(x.shape[0]), _PROBE_SAMPLES)]
    xg = x.clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    try:
        with torch.enable_grad():
            if kind_of(problem.kind).per_sample:
                y = torch.stack([problem.fn(xg[i]) for i in range(xg.shape[0])]).reshape(-1)
            else:
                y = problem.fn(xg).reshape(-1)
            m = xg.numel() if kind_of(problem.kind).symmetric else y.numel()
            u = torch.randn(m, generator=gen, dtype=torch.float64)
            v = torch.randn(xg.numel(), generator=gen, dtype=torch.float64)
            u, v = u.to(y.device, y.dtype), v.to(xg.device, xg.dtype)
            d = torch.zeros_like(v)
            if kind_of(problem.kind).symmetric:
                other = u  # probe u . (H v): reverse over reverse, as autograd's hessian
                if y.requires_grad:
                    (g,) = torch.autograd.grad(y.reshape(()), xg, create_graph=True,
                                               allow_unused=True)
                    if g is not None and g.requires_grad:
                        (h,) = torch.autograd.grad(g.reshape(-1), xg, v, allow_unused=True)
                        d = d if h is None else h.reshape(-1)
            else:
                other = v  # probe (Jᵀ u) . v
                if y.requires_grad:
                    (g,) = torch.autograd.grad(y, xg, u, allow_unused=True)
                    d = d if g is None else g.reshape(-1)
    except RuntimeError as exc:  # autograd refuses fn (it writes into x, say): recorded
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return {"error": f"{type(exc).__name__}: {first}"}
    # NOTE: any other exception is the user's own code raising (a backward
    # that fails on some worker): it propagates as it would from the first
    # chunk, so the shard fails with the user's message and frame.
    d = d.detach().double().cpu()
    other = other.detach().double().cpu()
    finite = torch.isfinite(d)
    d = torch.where(finite, d, torch.zeros_like(d))
    return {
        "uJv": float(d @ other),
        "scale": float(d.norm() * other.norm()),
        "nonfinite": int((~finite).sum()),
    }


def probe_failed(exc: Exception, spec: str) -> JacpipeError:
    """One line (exit 1) for the user's ``fn`` or backward raising in the driver's probe.

    The fingerprint's derivative probe (:func:`_derivative_probe`) runs the
    job's backward once on the driver before any shard; a backward that fails
    for some rows fails there first, and is named like a failed shard: the
    exception, its message and the user's frame.
    """
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    user = [f for f in frames if not any(p in f.filename for p in ("/pipeline/", "/torch/"))]
    last = user[-1] if user else None
    at = f' [File "{last.filename}", line {last.lineno}, in {last.name}]' if last else ""
    return JacpipeError(
        f"job {spec!r}: fn(x) or its backward raised {type(exc).__name__}: "
        f"{first_line(exc, limit=200)}{at} while its derivative was checked at x on the driver, "
        "before any shard ran; fix the job (each shard would call it the same way)",
        exit_code=1,
    )


def code_sha256(fn: Any) -> str | None:
    """sha256 of ``fn``'s code object (bytecode, constants, names), nested code included.

    Args:
        fn: a function, a callable object (its ``forward`` or ``__call__``),
            or a ``functools.partial``.

    Returns:
        The hex digest, or ``None`` where there is no Python code (builtins).
    """
    target = getattr(fn, "func", fn)  # functools.partial
    code = getattr(target, "__code__", None)
    if code is None:
        method = getattr(type(target), "forward", None)
        if method is None and callable(target):
            method = type(target).__call__
        code = getattr(method, "__code__", None)
    if code is None:
        return None
    return hashlib.sha256(_code_bytes(code)).hexdigest()


def _code_bytes(code: Any) -> bytes:
    parts = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        parts.append(_code_bytes(const) if hasattr(const, "co_code") else _const_repr(const))
    return b"\0".join(parts)


def _const_repr(const: Any) -> bytes:
    """A constant's repr, stable across processes (frozenset order follows string hashes)."""
    if isinstance(const, frozenset):
        return b"frozenset(" + b",".join(sorted(_const_repr(c) for c in const)) + b")"
    if isinstance(const, tuple):
        return b"(" + b",".join(_const_repr(c) for c in const) + b")"
    return repr(const).encode()


def source_sha256(spec: str) -> str | None:
    """sha256 of a job's source files: its module (built-ins: and ``jobs/_common.py``).

    Args:
        spec: a built-in job name (``"mlp"``: module ``jobs.mlp``) or
            ``"package.module:function"``.

    Returns:
        The hex digest, or ``None`` when the module has no source file.
    """
    import importlib.util
    import os

    if ":" in spec:
        modules = [spec.partition(":")[0]]
    else:
        modules = [f"jobs.{spec}", "jobs._common"]
    digest = hashlib.sha256()
    for name in modules:
        try:
            found = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            found = None
        origin = getattr(found, "origin", None)
        if not origin or not os.path.isfile(origin):
            return None
        with open(origin, "rb") as fh:
            digest.update(hashlib.sha256(fh.read()).digest())
    return digest.hexdigest()


def _parameters_json(fn: Any) -> dict[str, Any] | None:
    """A module's parameter layout and hash (``Problem.from_module``), else None."""
    from pipeline.problem.module import ModuleFunction

    return fn.facts() if isinstance(fn, ModuleFunction) else None


def _operator_json(operator: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The operator options as JSON (numbers from tensors or arrays as lists)."""
    if not operator:
        return None
    out = {}
    for k, v in sorted(operator.items()):
        v = v.tolist() if hasattr(v, "tolist") else v
        out[k] = [x.tolist() if hasattr(x, "tolist") else x for x in v] if isinstance(
            v, (list, tuple)) else v
    return out


def _json_float(v: float) -> float | str:
    """``v``, or ``"nan"`` / ``"inf"`` / ``"-inf"``: strict JSON has no non-finite numbers."""
    if v != v:
        return "nan"
    if v in (float("inf"), float("-inf")):
        return "inf" if v > 0 else "-inf"
    return v
