"""Problems: the function and point a job builds, the job registry, and fingerprints."""

from pipeline.core.faces import lazy_face

_OWNERS = {
    "Problem": "pipeline.problem.problem",
    "build_problem": "pipeline.problem.problem",
    "resolve_builder": "pipeline.problem.problem",
    "builtin_jobs": "pipeline.problem.problem",
    "validate": "pipeline.problem.problem",
    "fingerprint": "pipeline.problem.problem",
    "parse_params": "pipeline.problem.problem",
    "job_parameters": "pipeline.problem.problem",
    "rebuild": "pipeline.problem.problem",
}
__all__ = sorted(_OWNERS)
__getattr__, __dir__ = lazy_face(__name__, _OWNERS)
