"""The maths: derivatives of a function at a point, Ray-free and storage-free."""

from pipeline.core.faces import lazy_face

_OWNERS = {
    "jacobian_rows": "pipeline.maths.engine",
    "hessian_rows": "pipeline.maths.engine",
    "batched_rows": "pipeline.maths.engine",
    "iter_jacobian_rows": "pipeline.maths.engine",
    "iter_hessian_rows": "pipeline.maths.engine",
    "iter_batched_rows": "pipeline.maths.engine",
    "iter_rows": "pipeline.maths.kinds",
    "maths_of": "pipeline.maths.kinds",
    "reference_rows": "pipeline.maths.kinds",
    "reference_full": "pipeline.maths.kinds",
    "adjoint_check": "pipeline.maths.adjoint",
    "AdjointCheck": "pipeline.maths.adjoint",
    "vmap_spot_check": "pipeline.maths.adjoint",
    "SpotCheck": "pipeline.maths.adjoint",
    "checking": "pipeline.maths.checks",
    "ForwardModeWarning": "pipeline.maths.checks",
    "VmapMismatchWarning": "pipeline.maths.checks",
    "fd_check": "pipeline.maths.fd",
    "FDReport": "pipeline.maths.fd",
    "jacobian_reference": "pipeline.maths.references",
    "hessian_reference": "pipeline.maths.references",
    "batched_reference": "pipeline.maths.references",
    "laplacian": "pipeline.maths.taylor",
    "biharmonic": "pipeline.maths.taylor",
    "iter_third_rows": "pipeline.maths.operators",
    "point_columns": "pipeline.maths.operators",
    "ntk": "pipeline.maths.ntk",
    "sketch": "pipeline.maths.products",
    "jsj": "pipeline.maths.products",
    "Curvature": "pipeline.maths.products",
    "iter_param_rows": "pipeline.maths.params",
}
__all__ = sorted(_OWNERS)
__getattr__, __dir__ = lazy_face(__name__, _OWNERS)
