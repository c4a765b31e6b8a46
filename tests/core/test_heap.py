"""settle_heap (NOTE: [glibc's mmap threshold]): after it, buffers up to 31 MiB come from the
heap, whose freed pages the next call reuses, instead of pages mapped afresh each time."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.core import heap

_PROBE = """
import ctypes, sys
from pipeline.core import heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = heap.glibc()
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "settled":
    heap.settle_heap()
mapped = libc.mallinfo2().hblks
block = libc.malloc(30 << 20)  # a repeated evaluation's buffers are up to this size
print(libc.mallinfo2().hblks - mapped)
libc.free(block)
"""


def _mapped(mode: str) -> int:
    """Blocks glibc mapped afresh for one 30 MiB buffer in a fresh interpreter."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True,
                         check=True, env=env | {"PYTHONPATH": root})
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(heap.glibc() is None or not hasattr(heap.glibc(), "mallinfo2"),
                    reason="glibc 2.33 or later only")
def test_a_settled_heap_serves_large_buffers_itself():
    assert _mapped("fresh") == 1  # glibc's threshold where a fresh process has it: mapped
    assert _mapped("settled") == 0  # from the heap: its pages are reused call after call


def test_settle_heap_is_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "_SETTLED", [False])
    monkeypatch.setattr(heap, "glibc", lambda: calls.append(1) or None)
    heap.settle_heap()
    heap.settle_heap()
    assert calls == [1]
