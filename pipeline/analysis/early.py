"""``run --verify``'s reference, started while the run goes on; imports nothing heavy itself."""

from __future__ import annotations

import time
from typing import Any


class EarlyReference:
    """``run --verify``'s whole reference, computed in a thread while the run goes on.

    NOTE: [The reference while Ray starts]
        ``make run``'s ``--verify`` rebuilt the job and computed
        ``torch.autograd.functional.jacobian`` (0.9 s of its 2000 x 2000)
        after the shards, on a machine whose cores had sat half idle while
        Ray started (the raylet waits on its agents). Where Ray starts while
        the job is checked (its shards then all run on Ray workers, none in
        the driver, whose torch the thread would share), the run hands the
        job it built and checked to :meth:`start` as soon as the checks pass;
        where ``compare`` would check every row (:func:`fits_full_reference`)
        and the reference is at most :attr:`hold` bytes, a thread computes
        it from that problem, the same torch call ``compare`` makes, while
        Ray starts and the shards run. ``compare`` then takes that problem
        (checked against the stored fingerprint as any problem given) and
        that reference; where the thread was not started or failed, it
        rebuilds and computes as before. The result read back from Parquet
        is compared exactly as before.
    """

    def __init__(self, hold: int = 256 * 2**20) -> None:
        self.hold = hold
        self._problem: Any = None
        self._box: dict[str, Any] = {}
        self._thread: Any = None

    def start(self, job: Any) -> None:
        """Start the reference of a checked job (``CheckedJob``) when it qualifies."""
        import threading

        from pipeline.analysis.compare import fits_full_reference
        from pipeline.maths.kinds import reference_full

        problem, shapes = job.built, job.shapes
        if problem is None or job.smoothing is not None or (problem.operator or {}).get("samples"):
            return
        if (not fits_full_reference(shapes)
                or shapes.total_rows * shapes.n * shapes.itemsize > self.hold):
            return
        self._problem = problem

        def compute() -> None:
            try:
                t0 = time.perf_counter()
                values = reference_full(problem)
                self._box["reference"] = (values, time.perf_counter() - t0)
            except Exception:  # noqa: BLE001 - compare computes it again and says what fails
                pass

        self._thread = threading.Thread(target=compute, name="jacpipe-reference", daemon=True)
        self._thread.start()

    def result(self) -> tuple[Any, tuple[Any, float] | None]:
        """``(problem, (reference, seconds))`` once computed; ``(None, None)`` if not started."""
        if self._thread is None:
            return None, None
        self._thread.join()
        reference = self._box.get("reference")
        return (self._problem, reference) if reference is not None else (None, None)
