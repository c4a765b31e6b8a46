"""jacpipe: distributed Jacobians sharded by output rows, streamed to Parquet.

The public API is what this module re-exports; everything else is internal.
Heavy libraries load on first use, so ``import pipeline`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.errors import JacpipeError as JacpipeError
from pipeline.problem import Problem as Problem

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pipeline.compare import compare as compare_result  # noqa: F401
    from pipeline.engine import batched_rows as batched_rows
    from pipeline.engine import hessian_rows as hessian_rows
    from pipeline.engine import jacobian_rows as jacobian_rows
    from pipeline.plan import RunOptions as RunOptions
    from pipeline.reader import open_jacobian as open_jacobian
    from pipeline.reader import read_jacobian as read_jacobian
    from pipeline.runner import run as run
    from pipeline.sparsity import detect_sparsity as detect_sparsity

_LAZY = {
    "jacobian_rows": "pipeline.engine",
    "hessian_rows": "pipeline.engine",
    "batched_rows": "pipeline.engine",
    "read_jacobian": "pipeline.reader",
    "open_jacobian": "pipeline.reader",
    "run": "pipeline.runner",
    "RunOptions": "pipeline.plan",
    "compare_result": "pipeline.compare",
    "detect_sparsity": "pipeline.sparsity",
}

__all__ = ["JacpipeError", "Problem", *_LAZY]


# ``pipeline.compare`` is the module; its function is exported as ``compare_result``.
_RENAMED = {"compare_result": "compare"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), _RENAMED.get(name, name))
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
