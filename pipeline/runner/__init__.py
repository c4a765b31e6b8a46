"""Running a job: the plan, the driver, the scheduler, the worker, and Ray Jobs submission."""

from pipeline.core.faces import lazy_face

_OWNERS = {
    "run": "pipeline.runner.driver",
    "RunSummary": "pipeline.runner.driver",
    "make_plan": "pipeline.runner.plan",
    "plan_shards": "pipeline.runner.plan",
    "RunPlan": "pipeline.runner.plan",
    "Resources": "pipeline.runner.plan",
    "compute_shard": "pipeline.runner.worker",
    "Interrupted": "pipeline.runner.scheduler",
    "write_ntk": "pipeline.runner.ntk",
    "ntk_from": "pipeline.runner.ntk",
}
__all__ = sorted(_OWNERS)
__getattr__, __dir__ = lazy_face(__name__, _OWNERS)
