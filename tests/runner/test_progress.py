"""``pipeline.runner.progress``: phases and the heartbeat of a log that is not a terminal."""

from __future__ import annotations

from pipeline.core.shard import ShardResult
from pipeline.runner.progress import HEARTBEAT, Progress


def _result(rows: int) -> ShardResult:
    return ShardResult(index=0, start=0, stop=rows, file="part-00000.parquet", rows=rows,
                       checksum="0" * 64, seconds=1.0)


def test_phases_and_heartbeats_are_plain_lines_without_a_terminal():
    lines: list[str] = []
    p = Progress(4, enabled=True, echo=lines.append, terminal=False)
    p.phase("starting Ray (2 CPUs)")
    assert lines == ["starting Ray (2 CPUs)..."]
    start = p._last_line
    assert not p.beat(start + HEARTBEAT - 1)           # a line less than HEARTBEAT ago
    assert p.beat(start + HEARTBEAT + 1)                # then one line naming the phase
    assert lines[-1].startswith("starting Ray (2 CPUs)... shards 0/4")
    p.advance(_result(10))
    p.advance(_result(10))
    assert p.beat(p._last_line + HEARTBEAT)
    assert lines[-1].startswith("shards 2/4") and "ETA" in lines[-1]


def test_the_heartbeat_thread_lives_within_the_outermost_context():
    lines: list[str] = []
    p = Progress(2, enabled=True, echo=lines.append, terminal=False)
    with p:
        with p:
            assert p._beat is not None and p._beat.is_alive()
        assert p._beat is not None and p._beat.is_alive()
        beat = p._beat
    assert p._beat is None and not beat.is_alive()


def test_disabled_progress_prints_only_phases():
    lines: list[str] = []
    p = Progress(2, enabled=False, echo=lines.append, terminal=False)
    with p:
        p.phase("starting Ray (1 CPUs)")
        p.advance(_result(3))
        assert p._beat is None
    assert lines == ["starting Ray (1 CPUs)..."]


def test_a_slow_phase_prints_one_line_and_a_quick_or_disabled_one_none():
    import threading

    from pipeline.runner.progress import slow_phase

    lines: list[str] = []
    with slow_phase(lines.append, "detecting sparsity", after=60.0):
        pass
    with slow_phase(lines.append, "colouring", enabled=False, after=0.0):
        pass
    assert lines == []
    seen = threading.Event()
    with slow_phase(lambda s: (lines.append(s), seen.set()), "colouring", after=0.0):
        assert seen.wait(30.0)  # the watcher's line, whenever the machine gets to it
    assert lines == ["colouring..."]
