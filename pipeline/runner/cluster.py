"""Connecting to Ray: an embedded local Ray or a cluster, and what it offers.

A stale cluster environment, an unreachable address or a missing token is
one clear line before ``ray.init`` can hang on it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

from pipeline.core.errors import JacpipeError, first_line
from pipeline.core.signals import Terminated
from pipeline.runner.plan import (
    Resources,
)


def _probe_address(address: str) -> None:
    """Fail fast (instead of Ray's long retries) when nothing listens at ``address``."""
    if address.startswith(("http://", "https://")):
        raise JacpipeError(
            f"--address {address}: that is a dashboard (Jobs API) address; `jacpipe run "
            "--address` expects the cluster's GCS address HOST:PORT (usually port 6379) or "
            f"auto on a cluster node; to run through the dashboard use `jacpipe submit JOB "
            f"... --address {address}`"
        )
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return
    except ValueError:
        raise JacpipeError(f"--address {address!r}: expected HOST:PORT or auto") from None
    except OSError as exc:
        raise JacpipeError(
            f"--address {address}: no Ray cluster reachable ({exc.strerror or exc}); "
            "start one with `ray start --head` or `make cluster-up`, or omit --address "
            "to use an embedded local Ray"
        ) from None


def connect(address: str | None, num_cpus: int | None) -> bool:
    """Connect to Ray; returns True if this call started it (and should stop it).

    Args:
        address: ``HOST:PORT`` of a cluster's GCS, ``auto`` (on a cluster node,
            e.g. inside a submitted job) or ``ray://``; None starts an embedded Ray.
        num_cpus: CPUs of the embedded Ray (ignored with ``address``).

    Raises:
        JacpipeError: the cluster cannot be reached, refuses us (auth), or the
            address is a dashboard URL.
    """
    import ray

    if address:
        _probe_address(address)
    if num_cpus is not None and num_cpus < 1:
        raise JacpipeError(f"--num-cpus must be at least 1, got {num_cpus}")  # API callers
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": True}
    if address:
        try:
            _init_ray(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = first_line(exc)
            hint = ""
            if isinstance(exc, ConnectionError):
                # A token-auth cluster answers a client without a token like a dead one.
                hint = (
                    "; if the cluster uses token authentication, set RAY_AUTH_MODE=token "
                    "and RAY_AUTH_TOKEN_PATH (or RAY_AUTH_TOKEN)"
                )
            raise JacpipeError(
                f"--address {address}: cannot connect to Ray ({first}){hint}"
            ) from None
        return True
    refuse_stale_cluster_env()
    with _lean_node(ray):
        _init_ray(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return True


@contextlib.contextmanager
def _lean_node(ray: Any) -> Iterator[None]:
    """While an embedded Ray starts: no autoscaler monitor, no dashboard (API server) process.

    NOTE: [A lean embedded Ray]
        ``ray.init()`` on one machine starts an autoscaler monitor and, even
        with ``include_dashboard=False``, a dashboard process (for usage
        statistics), and waits for the dashboard to report its address
        before it starts the raylet: 1.2-2.4 s of ``ray.init``'s 4.4-5.6 s
        on 2 cores, and 1.5 CPU-seconds the driver's checks and the workers'
        imports wait for (``make run``). An embedded Ray has fixed resources,
        nothing to autoscale, and jacpipe uses neither the Jobs API nor the
        state API on it, so neither process starts (Ray's ``Node`` methods
        that start them are no-ops while ``ray.init`` runs; shutdown is
        quicker too: NOTE: [A quicker ray.shutdown]). Private to Ray: on a
        Ray whose ``Node`` lacks them, Ray starts as it always did.
        ``ray.init`` on a cluster (``--address``) is not touched.
    """
    node = getattr(getattr(getattr(ray, "_private", None), "node", None), "Node", None)
    if node is None:
        import importlib

        try:
            node = importlib.import_module("ray._private.node").Node
        except (ImportError, AttributeError):
            node = None
    names = ("start_monitor", "start_api_server")
    if node is None or not all(callable(getattr(node, n, None)) for n in names):
        yield
        return
    saved = {n: vars(node).get(n) for n in names}

    def no_monitor(self: Any) -> None:
        return None

    def no_api_server(self: Any, **_: Any) -> None:
        self._webui_url = ""  # what Ray leaves where no dashboard serves

    node.start_monitor = no_monitor
    node.start_api_server = no_api_server
    try:
        yield
    finally:
        for name, method in saved.items():
            if method is None:
                delattr(node, name)
            else:
                setattr(node, name, method)


def _init_ray(**kwargs: Any) -> None:
    """``ray.init(**kwargs)``; SIGTERM meanwhile is :class:`Terminated`, Ray shut down again.

    ``ray.init`` first installs its own SIGTERM handler (``sys.exit(15)``: exit
    15, no line) and then its core worker's, which dumps a C++ stack; a run
    stopped while Ray started left its manifest ``running``. Here the first
    becomes :class:`Terminated` (Ctrl-C stays a ``KeyboardInterrupt``), the
    second is not installed, and the caller's handler (a Python one, such as
    :func:`~pipeline.core.signals.sigterm_as_interrupt`'s) is put back once
    Ray is up.
    """
    import signal
    import threading

    import ray

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    constants = sys.modules.get("ray._private.ray_constants")
    dump = getattr(constants, "RAY_DISABLE_FAILURE_SIGNAL_HANDLER", None)
    if dump is not None:  # private to Ray: without it only the C++ stack comes back
        constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        ray.init(**kwargs)
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        ray.shutdown()
        raise Terminated() from None
    except KeyboardInterrupt:
        ray.shutdown()
        raise
    finally:
        if dump is not None:
            constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = dump
        if callable(before):
            signal.signal(signal.SIGTERM, before)


#: What `make cluster-up` exports; dropping them all makes `jacpipe run` local again.
CLUSTER_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")


def refuse_stale_cluster_env(environ: Any = None) -> None:
    """Refuse, in one line, cluster variables that would break an embedded local Ray.

    ``ray.init()`` joins ``RAY_ADDRESS`` when it is set, and demands a token
    when ``RAY_AUTH_MODE=token``: left over from a cluster that is gone (after
    ``make cluster-down``), they give Ray's raw retries or a 600-character
    auth error instead of a local run.

    Args:
        environ: the environment to look at (default ``os.environ``).

    Raises:
        JacpipeError: ``RAY_ADDRESS`` names a cluster nobody answers at, or
            token auth is on and no token can be read.
    """
    env = os.environ if environ is None else environ
    fix = (f"unset {' '.join(CLUSTER_ENV)} for an embedded local Ray, or pass --address "
           "HOST:PORT of a running cluster")
    address = env.get("RAY_ADDRESS", "").strip()
    if address and address not in ("local", "auto") and "://" not in address:
        try:
            _probe_address(address)
        except JacpipeError:
            raise JacpipeError(
                f"RAY_ADDRESS={address} is set but no Ray cluster answers there (left over "
                f"from a cluster that is down?): {fix}"
            ) from None
    if env.get("RAY_AUTH_MODE", "").strip().lower() != "token" or env.get("RAY_AUTH_TOKEN"):
        return
    path = env.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    try:
        with open(os.path.expanduser(path)) as fh:
            if fh.read().strip():
                return
    except OSError:
        pass
    raise JacpipeError(
        f"RAY_AUTH_MODE=token is set but the token file {path} is missing or empty (left "
        f"over from a cluster that is down?): {fix}"
    )


def ray_running() -> bool:

    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def cluster_resources() -> Resources:
    """What the connected Ray cluster offers (alive nodes only)."""
    import ray

    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return Resources(
        cpus=float(res.get("CPU", 0)),
        gpus=float(res.get("GPU", 0)),
        node_memory=min((int(n["Resources"].get("memory", 0)) for n in nodes), default=0),
        node_cpus=max((float(n["Resources"].get("CPU", 0)) for n in nodes), default=0.0),
        node_gpus=max((float(n["Resources"].get("GPU", 0)) for n in nodes), default=0.0),
    )


# NOTE: [One embedded Ray per process]
#   Starting Ray and its workers (each importing torch) costs 5-20 s on 2
#   cores; a Newton loop that called `pipeline.run` or `pipeline.jacobian`
#   ten times paid it ten times (29.5, 19.1, 17.1 s per iteration measured).
#   So the Python API starts one embedded Ray the first time a run needs it
#   and keeps it, and its workers (their torch, their cached problems), for
#   the later calls of the process; it stops at exit (atexit), on
#   `pipeline.shutdown()`, when a run fails or is interrupted (which kills the
#   tasks left in flight, as before), or when a later call asks for another
#   `num_cpus`. `jacpipe run` stops it at the end of its one run. A Ray the
#   caller started (`ray.init`) is theirs: never stopped by jacpipe, and
#   treated as a cluster.

#: The embedded Ray this process started and keeps: ``{"num_cpus": ...}`` while it is up.
_EMBEDDED: dict[str, Any] = {}


def embedded_running() -> bool:
    """Whether the Ray of this process is the embedded one jacpipe started (and keeps)."""
    if _EMBEDDED and not ray_running():
        _EMBEDDED.clear()  # stopped behind our back (the caller's ray.shutdown())
    return bool(_EMBEDDED)


def start_embedded(num_cpus: int | None) -> bool:
    """Start the embedded Ray, or keep the one running; True if it was started now.

    A running embedded Ray with another ``num_cpus`` than asked (a number, not
    None) is stopped and started again with it.

    Raises:
        JacpipeError: what :func:`connect` raises (stale cluster variables, ...).
    """
    import atexit

    if embedded_running():
        if num_cpus is None or num_cpus == _EMBEDDED["num_cpus"]:
            return False
        shutdown()
    connect(None, num_cpus)
    if "registered" not in _ATEXIT:
        atexit.register(shutdown)
        _ATEXIT.add("registered")
    _EMBEDDED["num_cpus"] = num_cpus
    return True


_ATEXIT: set[str] = set()


def shutdown() -> None:
    """Stop the embedded Ray that jacpipe started in this process (nothing else).

    ``pipeline.shutdown()``: the workers it kept (and their memory) go; the
    next run that needs Ray starts a new one. A Ray the caller started with
    ``ray.init`` is left alone.
    """
    if not _EMBEDDED:
        return
    _EMBEDDED.clear()
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        _stop_monitor(ray)
        ray.shutdown()


def _stop_monitor(ray: Any) -> None:
    """Kill the embedded Ray's autoscaler monitor, which ``ray.shutdown`` waits 1 s for.

    NOTE: [A quicker ray.shutdown]
        ``ray.shutdown`` stops the processes ``ray.init`` started one after
        the other, SIGTERM then up to 1 s each: the raylet and the GCS go in
        0.1 s, but the autoscaler monitor, told to stop after the GCS is
        gone, tries to report its own death to it and is killed only when
        its second is up (1.0 of the 1.4 s of every shutdown, measured with
        Ray 2.60). An embedded Ray has fixed resources and nothing for it to
        scale, so it is killed first; the rest of the shutdown is Ray's.
        Private to Ray: where its node object has moved, the shutdown is
        simply 1 s slower.
    """
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    processes = getattr(node, "all_processes", None)
    if not isinstance(processes, dict):
        return
    for info in processes.get("monitor", []):
        process = getattr(info, "process", None)
        try:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(timeout=1)
        except Exception:  # noqa: BLE001 - best effort: ray.shutdown stops it anyway
            pass
