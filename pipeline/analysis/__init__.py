"""Reading results for people: compare against torch, inspect, plot, truncated SVD."""

from pipeline.core.faces import lazy_face

_OWNERS = {
    "compare": "pipeline.analysis.compare",
    "CompareReport": "pipeline.analysis.compare",
    "summarize": "pipeline.analysis.inspection",
    "plot_result": "pipeline.analysis.inspection",
    "svd_result": "pipeline.analysis.inspection",
    "operator_svd": "pipeline.analysis.svd",
    "streamed_svd": "pipeline.analysis.svd",
}
__all__ = sorted(_OWNERS)
__getattr__, __dir__ = lazy_face(__name__, _OWNERS)
