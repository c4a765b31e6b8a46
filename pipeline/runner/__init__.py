"""Running a job: the plan, the driver, the scheduler, the worker, and Ray Jobs submission."""
