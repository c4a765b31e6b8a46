"""The engine's rows on every op of PyTorch's operator database (``tests/opdb.py``).

For each op with autograd support, on float64 samples: reverse rows from
``jacobian_rows`` equal ``torch.autograd.functional.jacobian`` (a loop of plain
backward passes, no vmap), and forward rows equal ``torch.func.jacfwd`` where
the op has forward-mode AD and jacfwd runs. Where ``jacfwd`` and reverse mode
differ, the op must be one of ``opdb.EXPECTED_DISAGREEMENTS`` (with its reason).
"""

from __future__ import annotations

import collections
import time
import warnings

import pytest

from pipeline.maths.engine import jacobian_rows
from tests import opdb


def check_rows(case: opdb.Case) -> tuple[str, bool]:
    """('ok' or why the forward half was skipped, whether the modes disagree); raises
    AssertionError where the engine's rows differ from torch's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the ops' own deprecations; VmapFallbackWarning
        try:
            rev = opdb.reverse_jacobian(case.fn, case.x)
        except Exception:  # noqa: BLE001 - the reference itself fails: not ours to judge
            return "skip: reverse reference fails", False
        got = jacobian_rows(case.fn, case.x, 0, case.m)
        err = opdb.disagreement(got, rev)
        assert err is None, f"{case.name}: reverse rows differ from autograd by {err:.3g}"
        if not case.forward_ad:
            return "ok (reverse only: no forward AD)", False
        with opdb.write_order_fixed(case.name):  # the one write kept: the same in both
            try:
                fwd = opdb.forward_jacobian(case.fn, case.x)
            except Exception:  # noqa: BLE001 - torch's jacfwd refuses the op (no batching rule)
                return "ok (reverse only: jacfwd fails)", False
            got = jacobian_rows(case.fn, case.x, 0, case.m, method="fwd")
        err = opdb.disagreement(got, fwd)
        assert err is None, f"{case.name}: forward rows differ from jacfwd by {err:.3g}"
    return "ok", opdb.disagreement(fwd, rev) is not None


def _corpus(found) -> set[str]:
    began = time.perf_counter()
    tally: collections.Counter = collections.Counter()
    names, failures, disagree = collections.defaultdict(list), [], set()
    for _, case in found:
        if isinstance(case, str):
            tally[case] += 1
            continue
        try:
            result, differ = check_rows(case)
        except AssertionError as exc:
            failures.append(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - the engine raised: a failure
            failures.append(f"{case.name}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        tally[result] += 1
        names[result].append(case.name)
        if differ:
            disagree.add(case.name)
    print(f"\nop_db rows: {dict(tally)} in {time.perf_counter() - began:.1f} s; "
          f"forward and reverse differ on {sorted(disagree)}")
    for reason, ops in sorted(names.items()):
        if reason != "ok":
            print(f"  {reason}: {', '.join(sorted(set(ops)))}")
    assert not failures, f"{len(failures)} samples:\n" + "\n".join(failures)
    unexpected = disagree - set(opdb.EXPECTED_DISAGREEMENTS)
    assert not unexpected, f"forward and reverse mode differ on {sorted(unexpected)}"
    assert tally["ok"] > 300
    return disagree


def test_rows_equal_torch_on_one_sample_per_op():
    disagree = _corpus(opdb.picked())
    assert "linalg.cholesky" in disagree  # the expected disagreements are live


@pytest.mark.slow
@pytest.mark.opdb_all  # every sample of every op: `make test-opdb` (not in `make test`)
def test_rows_equal_torch_on_every_sample():
    _corpus(opdb.cases())
