"""jacpipe: distributed Jacobians sharded by output rows, streamed to Parquet.

The public API is what this module re-exports; everything else is internal.
Heavy libraries load on first use, so ``import pipeline`` is cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.core import __version__ as __version__
from pipeline.core.errors import JacpipeError as JacpipeError
from pipeline.problem.problem import Problem as Problem

if TYPE_CHECKING:
    from pipeline.analysis.compare import compare as compare_result  # noqa: F401
    from pipeline.core.options import RunOptions as RunOptions
    from pipeline.maths.engine import batched_rows as batched_rows
    from pipeline.maths.engine import hessian_rows as hessian_rows
    from pipeline.maths.engine import jacobian_rows as jacobian_rows
    from pipeline.maths.ntk import ntk as ntk
    from pipeline.maths.products import Curvature as Curvature
    from pipeline.maths.products import jsj as jsj
    from pipeline.maths.products import sketch as sketch
    from pipeline.maths.taylor import biharmonic as biharmonic
    from pipeline.maths.taylor import laplacian as laplacian
    from pipeline.maths.taylor import taylor as taylor
    from pipeline.runner.cluster import shutdown as shutdown
    from pipeline.runner.driver import run as run
    from pipeline.runner.front import batched_jacobian as batched_jacobian
    from pipeline.runner.front import hessian as hessian
    from pipeline.runner.front import jacobian as jacobian
    from pipeline.runner.ntk import ntk_from as ntk_from
    from pipeline.runner.ntk import write_ntk as write_ntk
    from pipeline.sparse.detect import detect_sparsity as detect_sparsity
    from pipeline.store.reader import open_jacobian as open_jacobian
    from pipeline.store.reader import read_jacobian as read_jacobian

_LAZY = {
    "jacobian_rows": "pipeline.maths.engine",
    "hessian_rows": "pipeline.maths.engine",
    "batched_rows": "pipeline.maths.engine",
    "ntk": "pipeline.maths.ntk",
    "sketch": "pipeline.maths.products",
    "jsj": "pipeline.maths.products",
    "Curvature": "pipeline.maths.products",
    "taylor": "pipeline.maths.taylor",
    "laplacian": "pipeline.maths.taylor",
    "biharmonic": "pipeline.maths.taylor",
    "read_jacobian": "pipeline.store.reader",
    "open_jacobian": "pipeline.store.reader",
    "run": "pipeline.runner.driver",
    "jacobian": "pipeline.runner.front",
    "hessian": "pipeline.runner.front",
    "batched_jacobian": "pipeline.runner.front",
    "shutdown": "pipeline.runner.cluster",
    "write_ntk": "pipeline.runner.ntk",
    "ntk_from": "pipeline.runner.ntk",
    "RunOptions": "pipeline.core.options",
    "compare_result": "pipeline.analysis.compare",
    "detect_sparsity": "pipeline.sparse.detect",
}

__all__ = ["JacpipeError", "Problem", *_LAZY]


# ``pipeline.analysis.compare`` is the module; its function is exported as ``compare_result``.
_RENAMED = {"compare_result": "compare"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), _RENAMED.get(name, name))
        globals()[name] = value  # found once: a loop's `pipeline.jacobian` skips this hook
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
