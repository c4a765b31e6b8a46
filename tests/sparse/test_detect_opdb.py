"""Sparsity detection on every op of PyTorch's operator database (``tests/opdb.py``).

For each op with autograd support, on float64 samples: the global pattern
(traced once at the sample's ``x``) and the local pattern at each of three
points (the first one only in the default test, all three in the slow one)
contain every finite nonzero of torch's Jacobian at those points
(``torch.func.jacrev``; where vmap cannot run the op, the loop of
``torch.autograd.functional.jacobian``, which ``tests/maths/test_engine_opdb.py``
compares with the engine). Ops without a rule, or whose rule fails, may be a
dense block (a ``SparsityWarning``); global detection may refuse
data-dependent control flow on x (counted), and the ops of ``KNOWN_REFUSALS``
are refused; any other refusal or a missed nonzero fails.
"""

from __future__ import annotations

import collections
import time
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from pipeline.sparse.detect import SparsityError, trace_sparsity
from tests import opdb

#: Ops detection refuses on purpose, with why (anything else refused fails the test).
KNOWN_REFUSALS = {
    "nn.functional.pad.circular": "torch's Python decomposition writes into slices below "
                                  "functionalize: detection refuses rather than miss them",
}

#: Why a sample that draws from a generator op_db seeds inside ``fn`` (``wrapper_set_seed``:
#: a training ``multi_head_attention_forward`` with ``dropout_p=0.5``) is refused: eager
#: draws the dropout mask (``aten.bernoulli_``, traced as ``aten.bernoulli.p``), and
#: detection refuses every draw it traces, seeded or not (the seed is not in the trace);
#: the function is deterministic, so the engine's rows are still checked.
SEEDED_DRAWS = "op_db seeds the draw inside fn; detection refuses every draw it traces"


def _contains(pattern, j: torch.Tensor) -> bool:
    nz = opdb.nonzeros(j).numpy()
    return not (nz & ~pattern.toarray()).any()


def _pattern(case: opdb.Case, x: torch.Tensor, mode: str):
    """The detected pattern, or None where global mode refuses control flow on x, or
    detection refuses a seeded draw (:data:`SEEDED_DRAWS`)."""
    try:
        report = trace_sparsity(case.fn, x, mode=mode, max_density=None)
    except SparsityError as exc:
        if (mode == "global" and "data-dependent" in str(exc) or case.name in KNOWN_REFUSALS
                or case.seeded_draws and "random op" in str(exc)):
            return None
        raise AssertionError(f"{case.name}: {mode} detection refused: {exc}") from None
    assert not case.seeded_draws, f"{case.name}: {mode} detection accepted a random draw " \
                                  f"({', '.join(case.seeded_draws)})"
    if report.dense:  # the byte cap: a dense answer holds every nonzero
        return sp.csr_matrix(np.ones((case.m, x.numel()), dtype=bool))
    return report.pattern


def check_patterns(case: opdb.Case, local_points: int = 3) -> str:
    """'ok' or 'ok (global refused: control flow on x)'; AssertionError on a missed nonzero.

    The global pattern is checked at three points, the local one at the first
    ``local_points`` of them (each is one more trace)."""
    points = opdb.points(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SparsityWarning: conservative blocks are allowed
        try:
            refs = [opdb.batched_jacobian(case.fn, p) for p in points]
        except Exception:  # noqa: BLE001 - the reference itself fails: not ours to judge
            return "skip: reference fails"
        glob = _pattern(case, case.x, "global")
        for k, (p, j) in enumerate(zip(points, refs, strict=True)):
            if glob is not None:
                assert _contains(glob, j), f"{case.name}: global pattern misses at point {k}"
            local = _pattern(case, p, "local") if k < local_points else None
            if local is not None:
                assert _contains(local, j), f"{case.name}: local pattern misses at point {k}"
    if case.name in KNOWN_REFUSALS:
        return "refused (known)"
    if case.seeded_draws:
        return f"refused (random: {', '.join(case.seeded_draws)}; {SEEDED_DRAWS})"
    return "ok" if glob is not None else "ok (global refused: control flow on x)"


def _corpus(found, local_points: int) -> None:
    began = time.perf_counter()
    tally: collections.Counter = collections.Counter()
    names, failures = collections.defaultdict(list), []
    for _, case in found:
        if isinstance(case, str):
            tally[case] += 1
            continue
        try:
            result = check_patterns(case, local_points)
        except AssertionError as exc:
            failures.append(str(exc))
            continue
        tally[result] += 1
        names[result].append(case.name)
    print(f"\nop_db sparsity: {dict(tally)} in {time.perf_counter() - began:.1f} s")
    for reason, ops in sorted(names.items()):
        if reason != "ok":
            print(f"  {reason}: {', '.join(sorted(set(ops)))}")
    assert not failures, f"{len(failures)} samples:\n" + "\n".join(failures)
    assert tally["ok"] > 300


def test_patterns_contain_every_nonzero_on_one_sample_per_op():
    # NOTE: the local pattern at x only (two more traces per op would add about 15 s of
    # CPU); the all-samples test checks it at all three points.
    _corpus(opdb.picked(), local_points=1)


@pytest.mark.slow
@pytest.mark.opdb_all  # every sample of every op: `make test-opdb` (not in `make test`)
def test_patterns_contain_every_nonzero_on_every_sample():
    _corpus(opdb.cases(), local_points=3)


def test_the_corpus_sees_a_missed_nonzero():
    """The check fails on a pattern that misses an entry (a diagonal pattern for a cumsum)."""
    x = torch.randn(4, dtype=torch.float64)
    j = opdb.reverse_jacobian(lambda t: t.cumsum(0), x)
    assert not _contains(sp.identity(4, dtype=bool, format="csr"), j)
    assert _contains(sp.csr_matrix(torch.ones(4, 4, dtype=torch.bool).tril().numpy()), j)
