"""Sparse Jacobians: pattern detection, per-op rules, colouring and compressed evaluation."""

from pipeline.core.faces import lazy_face

_OWNERS = {
    "detect_sparsity": "pipeline.sparse.detect",
    "trace_sparsity": "pipeline.sparse.detect",
    "SparsityReport": "pipeline.sparse.detect",
    "Coloring": "pipeline.sparse.coloring",
    "choose_coloring": "pipeline.sparse.coloring",
    "banded_pattern": "pipeline.sparse.compressed",
    "stencil_pattern": "pipeline.sparse.compressed",
    "load_pattern": "pipeline.sparse.compressed",
    "sparse_jacobian_rows": "pipeline.sparse.compressed",
    "sparse_hessian_rows": "pipeline.sparse.compressed",
    "evaluate_rows": "pipeline.sparse.compressed",
}
__all__ = sorted(_OWNERS)
__getattr__, __dir__ = lazy_face(__name__, _OWNERS)
