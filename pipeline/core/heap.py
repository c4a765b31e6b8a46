"""The C heap between repeated evaluations: freed buffers reused, not faulted in again (glibc).

NOTE: [glibc's mmap threshold]
    glibc serves an allocation at or above its mmap threshold (128 KiB in a
    fresh process) with fresh pages from the kernel and hands them back on
    ``free``; once such a buffer is freed the threshold rises to its size (up
    to 32 MiB, glibc's ``DEFAULT_MMAP_THRESHOLD_MAX``) and the heap's top is
    trimmed only past twice that. Where it sits is left by the process's
    history. A repeated compressed evaluation at n = 10^5 allocates and
    frees megabyte buffers on every call (the compressed matrix, its
    entries, the check's pullback, inductor's intermediates): measured on
    BROYDN3D's checked Hessian (n = 10^5, 2 threads), each call faulted
    about 960 fresh pages in (``getrusage``) and took 3.7 ms (unchecked 3.1
    ms); after one 31 MiB buffer allocated and freed, 0 faults and 3.1 ms
    (unchecked 2.6 ms). :func:`settle_heap` does that once per process
    before the first kept plan or compiled pass: exactly what any 31 MiB
    temporary freed in the process does. The process then keeps up to 62 MiB
    of freed heap for reuse instead of returning it at once (a worker still
    hands it back after each part: ``malloc_trim`` in
    :mod:`pipeline.store.parts`). Buffers above 32 MiB (the 10^6 heat
    residual's 40 MB) glibc always maps fresh; the README gives the
    environment (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``) that keeps
    those too, a process-wide choice left to the user. Where the user has
    set glibc's tunables, glibc no longer moves its threshold and this
    changes nothing; on other C libraries it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

#: What is allocated and freed once: below glibc's 32 MiB cap with its chunk header.
SETTLE_BYTES = 31 << 20

_SETTLED = [False]


def settle_heap() -> None:
    """Raise glibc's mmap threshold to :data:`SETTLE_BYTES` once per process (NOTE above)."""
    if _SETTLED[0]:
        return
    _SETTLED[0] = True
    libc = glibc()
    if libc is None:
        return
    block = libc.malloc(SETTLE_BYTES)  # mapped, never touched: no page is faulted in
    if block:
        libc.free(block)


@functools.cache
def glibc() -> Any:
    """The C library where it is glibc (``malloc``, ``free`` typed; ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others
            return None
    except OSError:
        return None
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.restype = None
    libc.free.argtypes = [ctypes.c_void_p]
    return libc
