"""SIGTERM handled like Ctrl-C: :func:`sigterm_as_interrupt`, :class:`Terminated`.

One mechanism for every place a long step may be stopped by ``kill PID`` or a
stopped cluster job: the shard loop (:mod:`pipeline.runner.scheduler`), the
run around it (Ray starting: :mod:`pipeline.runner.driver`, whose
``ray.init`` raises :class:`Terminated` from :mod:`pipeline.runner.cluster`),
the ``--verify`` comparison and ``jacpipe export``. Each turns the signal into one
line and exit :data:`SIGTERM_EXIT`, and cleans up what it was writing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

#: Exit code of a run stopped by SIGTERM (128 + 15, as a shell reports it).
SIGTERM_EXIT = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (a stopped cluster job, ``kill``): handled like Ctrl-C.

    A :class:`KeyboardInterrupt`: Ray's blocking calls (``ray.wait``) check
    signals and let only ``KeyboardInterrupt`` through, as a plain one; any
    other exception raised by the handler there surfaced as "SystemError:
    <cyfunction CoreWorker.wait> returned a result with an exception set"
    and a run marked ``failed``. The handler also records the signal
    (:class:`SigtermSeen`), so the run still reports SIGTERM.
    """


class SigtermSeen:
    """Whether SIGTERM arrived while :func:`sigterm_as_interrupt` was installed."""

    received = False


@contextlib.contextmanager
def sigterm_as_interrupt(seen: SigtermSeen) -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` in the main thread for the duration.

    Installed after Ray starts, so it replaces the handler Ray's core worker
    installs (which dumps a C++ stack and aborts). ``seen`` records the signal
    even where Ray turns the exception into a plain ``KeyboardInterrupt``.
    Outside the main thread (where no handler can be set) it does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        del signum, frame
        seen.received = True
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
