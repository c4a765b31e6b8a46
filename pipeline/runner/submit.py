"""Thin client over the Ray Jobs API: submit a jacpipe run to a cluster, follow it.

Every failure a user can cause (bad address, cluster down, missing or wrong token,
unknown submission id) is raised as one-line :class:`JacpipeError`. Ray is imported
inside the functions so that ``jacpipe --help`` stays fast.

Facts this module relies on (Ray 2.60, checked by experiment):

* ``JobSubmissionClient(address)`` *overrides* ``address`` with the environment
  variables ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` when they are set, and it
  treats ``host:port`` without a scheme as a GCS address (a 40 s hang when it is a
  dashboard port). We resolve the address ourselves, always hand Ray a full
  ``http://`` URL, and skip Ray's lookup (never editing ``os.environ``).
* The client sends the auth token only when ``RAY_AUTH_MODE=token`` is set in *its*
  environment; we read the token the way Ray does (``RAY_AUTH_TOKEN``, then
  ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``) and send it explicitly.
* ``requests`` calls in the SDK have no timeout; we add one.
* ``py_modules`` with a single ``.py`` file fails in the Jobs SDK of Ray 2.60
  (``ValueError: directory ... must be an existing directory``), so the code is
  shipped as one small staged ``working_dir``: ``pipeline/``, ``jobs/`` and the
  user's own job module, nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pipeline.core.errors import JacpipeError, first_line

T = TypeVar("T")

DEFAULT_DASHBOARD_PORT = 8265
#: (connect, read) seconds for every HTTP request to the dashboard.
HTTP_TIMEOUT: tuple[float, float] = (5.0, 60.0)
#: Seconds between polls in :func:`wait`.
POLL_INTERVAL = 0.5
#: Environment variable naming the Python executable on the cluster.
REMOTE_PYTHON_ENV = "JACPIPE_REMOTE_PYTHON"
#: What is never shipped in the runtime env.
EXCLUDES = [
    "__pycache__",
    "*.pyc",
    "*.pyo",
    ".git",
    ".venv",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    "*.egg-info",
    "*.parquet",
]
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})

_ENV_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


# ---------------------------------------------------------------------------
# Address and token
# ---------------------------------------------------------------------------


_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def normalize_address(address: str | None) -> str:
    """Turn a user's dashboard address into ``http(s)://host:port``.

    Accepts ``http://host:8265``, ``https://host``, ``host:8265`` and ``host``; when
    ``address`` is empty, falls back to ``RAY_API_SERVER_ADDRESS`` then ``RAY_ADDRESS``.

    Args:
        address: the Ray dashboard (Jobs API) address, or None.

    Returns:
        The URL, without a trailing slash.

    Raises:
        JacpipeError: no address anywhere, or one that is not a dashboard URL.
    """
    source = "--address"
    if not address:
        for var in _ENV_ADDRESS_VARS:
            if os.environ.get(var):
                address, source = os.environ[var], var
                break
    if not address:
        raise JacpipeError(
            "no Ray cluster address: expected the dashboard address of the head node; "
            "pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS"
        )
    raw = address.strip().rstrip("/")
    if raw in ("auto", "local"):
        raise JacpipeError(
            f"{source}={raw!r} is not a dashboard address: expected http://HEAD:8265 "
            "(the Ray Jobs API of the head node)"
        )
    if "://" not in raw:
        raw = "http://" + raw
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https"):
        raise JacpipeError(
            f"{source}={address!r}: expected an http(s) dashboard address like "
            f"http://HEAD:{DEFAULT_DASHBOARD_PORT}, got scheme {parts.scheme!r} "
            "(Ray Client ray:// addresses are not supported by submit)"
        )
    try:
        port = parts.port
    except ValueError:
        raise JacpipeError(f"{source}={address!r}: the port is not a number") from None
    if not parts.hostname:
        raise JacpipeError(f"{source}={address!r}: no host name in the address")
    if ":" not in parts.hostname and not _HOST_NAME.fullmatch(parts.hostname):
        raise JacpipeError(
            f"{source}={address!r}: {parts.hostname!r} is not a host name (letters, digits, "
            f"'-' and '.'); expected http://HEAD:{DEFAULT_DASHBOARD_PORT}, the dashboard "
            "address of the head node"
        )
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is None:
        port = DEFAULT_DASHBOARD_PORT if parts.scheme == "http" else 443
    return f"{parts.scheme}://{host}:{port}{parts.path}"


def _auth_token() -> str | None:
    """The Ray auth token, looked up like Ray does; None when there is none."""
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise JacpipeError(
                f"RAY_AUTH_TOKEN_PATH={path!r}: cannot read the Ray auth token "
                f"({exc.strerror}); point it at the token file or unset it"
            ) from None
        if not token:
            raise JacpipeError(f"RAY_AUTH_TOKEN_PATH={path!r}: the token file is empty")
        return token
    default = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        return default.read_text().strip() or None
    return None


def auth_headers() -> dict[str, str]:
    """HTTP headers carrying the Ray auth token, if one is configured.

    Returns:
        ``{"Authorization": "Bearer <token>"}`` or an empty dict.

    Raises:
        JacpipeError: ``RAY_AUTH_TOKEN_PATH`` names an unreadable or empty file.
    """
    token = _auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


# ---------------------------------------------------------------------------
# Client and error mapping
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _errors(url: str, submission_id: str | None = None) -> Iterator[None]:
    """Translate Ray / HTTP errors into one-line JacpipeErrors."""
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except JacpipeError:
        raise
    except AuthenticationError as exc:
        first = first_line(exc)
        raise JacpipeError(
            f"Ray cluster at {url} refused the request ({first}): expected a valid auth "
            "token; copy the cluster's token into ~/.ray/auth_token, or set "
            "RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH"
        ) from None
    except (ConnectionError, requests.ConnectionError):
        raise JacpipeError(
            f"cannot reach the Ray dashboard at {url}: expected a running Ray head node "
            f"there; check --address (e.g. http://HEAD:{DEFAULT_DASHBOARD_PORT}) "
            "and that `ray start --head` is running"
        ) from None
    except (requests.Timeout, TimeoutError):
        raise JacpipeError(
            f"Ray dashboard at {url} did not answer within {HTTP_TIMEOUT[1]:.0f} s: "
            "expected a running head node; check the address and that the head is healthy"
        ) from None
    except RuntimeError as exc:
        text = str(exc)
        if submission_id is not None and ("404" in text or "does not exist" in text):
            raise JacpipeError(
                f"no job {submission_id!r} on the Ray cluster at {url}: expected a "
                "submission id from `jacpipe submit`; see `jacpipe list`"
            ) from None
        if "Version check returned 404" in text or "Jobs API is not supported" in text:
            raise JacpipeError(
                f"{url} is not a Ray dashboard (no Jobs API there): expected the head's "
                f"dashboard address, usually port {DEFAULT_DASHBOARD_PORT}"
            ) from None
        line = first_line(text) or type(exc).__name__
        raise JacpipeError(f"Ray Jobs API at {url} failed: {line}") from None


def _call(address: str | None, submission_id: str | None, op: Callable[[Any], T]) -> T:
    """``op(client)`` on a client for ``address``, its errors as one-line JacpipeErrors."""
    client = _client(address)
    with _errors(client._jacpipe_url, submission_id):
        return op(client)


def _client(address: str | None) -> Any:
    """A ``JobSubmissionClient`` for ``address`` with timeouts and an explicit token.

    The address is resolved here once and handed to Ray explicitly: Ray's own
    resolution lets ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` win over its
    argument, so it is bypassed rather than the environment edited (editing
    ``os.environ`` races with other threads, e.g. ``submit --wait``'s log
    stream and status poll, which then saw no address at all).
    """
    import ray
    from ray.dashboard.modules.dashboard_sdk import SubmissionClient
    from ray.job_submission import JobSubmissionClient

    class _TimeoutClient(JobSubmissionClient):
        def __init__(self, url: str, headers: dict[str, str]) -> None:
            # NOTE: JobSubmissionClient.__init__ minus its environment lookup
            # (ray.dashboard.utils.get_address_for_submission_client).
            self._client_ray_version = ray.__version__
            SubmissionClient.__init__(self, address=url, headers=headers)
            self._check_connection_and_version(
                min_version="2.0",
                version_error_message="Jobs API is not supported on the Ray cluster, "
                "or the cluster's Ray is older than 2.0.",
            )

        def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
            kwargs.setdefault("timeout", HTTP_TIMEOUT)
            return super()._do_request(method, endpoint, **kwargs)

    url = normalize_address(address)
    headers = auth_headers()
    with _errors(url):
        client = _TimeoutClient(url, headers)
    client._jacpipe_url = url
    return client


# ---------------------------------------------------------------------------
# What is shipped
# ---------------------------------------------------------------------------


def _is_installed(path: Path) -> bool:
    """True for code that lives in site-packages or the standard library."""
    parts = set(path.resolve().parts)
    if parts & {"site-packages", "dist-packages"}:
        return True
    stdlib = Path(sys.base_prefix).resolve() / "lib"
    return stdlib in path.resolve().parents


def _module_source(name: str, what: str) -> Path | None:
    """The file or package directory of top-level module ``name``; None if installed."""
    top = name.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None:
        # Console scripts do not put the current directory on sys.path.
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(top, [os.getcwd()])
    if spec is None:
        raise JacpipeError(
            f"{what}: cannot find module {top!r} locally to ship it to the cluster; "
            "run from the directory that holds it or add it to PYTHONPATH"
        )
    if spec.submodule_search_locations:
        locations = list(spec.submodule_search_locations)
        if len(locations) != 1:
            raise JacpipeError(
                f"{what}: {top!r} is a namespace package spread over {len(locations)} "
                "directories; give it an __init__.py so it can be shipped"
            )
        source = Path(locations[0])
    elif spec.origin and spec.origin.endswith(".py"):
        source = Path(spec.origin)
    else:
        return None  # built-in or compiled module: must exist on the cluster
    return None if _is_installed(source) else source


def ship_paths(job: str, extra_modules: list[str] | None = None) -> list[Path]:
    """Local files and package directories a submitted run needs on the cluster.

    Args:
        job: a built-in job name or ``"package.module:function"``.
        extra_modules: more module names, or paths to ``.py`` files / package dirs.

    Returns:
        ``pipeline/``, ``jobs/`` and the user's own modules (installed ones left out).

    Raises:
        JacpipeError: a named module or path cannot be found.
    """
    here = Path(__file__).resolve().parents[1]  # the pipeline package
    paths = [here]
    jobs_dir = _module_source("jobs", "built-in jobs") or here.parent / "jobs"
    paths.append(jobs_dir)
    names: list[tuple[str, str]] = []
    if ":" in job:
        names.append((job.partition(":")[0], f"job {job!r}"))
    for extra in extra_modules or []:
        p = Path(extra)
        if extra.endswith(".py") or os.sep in extra or p.is_dir():
            if not p.exists():
                raise JacpipeError(f"extra module {extra!r}: no such file or directory")
            paths.append(p.resolve())
        else:
            names.append((extra, f"extra module {extra!r}"))
    for name, what in names:
        if name.split(".")[0] in ("pipeline", "jobs"):
            continue
        src = _module_source(name, what)
        if src is not None:
            paths.append(src.resolve())
    unique: dict[str, Path] = {}
    for p in paths:
        if p.name in unique and unique[p.name] != p:
            raise JacpipeError(
                f"two different modules named {p.name!r} would be shipped "
                f"({unique[p.name]} and {p}); rename one"
            )
        unique[p.name] = p
    return list(unique.values())


def _stage(paths: list[Path], dest: Path) -> None:
    """Copy ``paths`` into ``dest`` (the working_dir), leaving caches and outputs out."""
    ignore = shutil.ignore_patterns(*EXCLUDES)
    for p in paths:
        if p.is_dir():
            shutil.copytree(p, dest / p.name, ignore=ignore)
        else:
            shutil.copy2(p, dest / p.name)


def build_entrypoint(job: str, run_args: list[str]) -> str:
    """The shell command the cluster runs: ``python -m pipeline.cli run JOB ... --address auto``.

    Args:
        job: the job spec, as for ``jacpipe run``.
        run_args: the other ``jacpipe run`` arguments, unquoted.

    Returns:
        One shell-quoted command line.

    Raises:
        JacpipeError: ``run_args`` already names an address.
    """
    for arg in run_args:
        if arg == "--address" or arg.startswith("--address="):
            raise JacpipeError(
                "submit runs the job on the cluster with --address auto: "
                "leave --address out of the run arguments"
            )
    python = os.environ.get(REMOTE_PYTHON_ENV, "python")
    return shlex.join([python, "-m", "pipeline.cli", "run", job, *run_args, "--address", "auto"])


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def submit(
    job: str,
    run_args: list[str],
    *,
    address: str | None,
    submission_id: str | None = None,
    extra_modules: list[str] | None = None,
) -> str:
    """Submit ``jacpipe run JOB ...`` as a Ray job.

    Args:
        job: a built-in job name or ``"package.module:function"``.
        run_args: further ``jacpipe run`` arguments (``-p n=4000``, ``--out s3://...``).
        address: the dashboard address (``http://HEAD:8265``); env fallback when None.
        submission_id: an id to use instead of a generated one.
        extra_modules: more local modules the job imports (names or paths).

    Returns:
        The submission id.

    Raises:
        JacpipeError: unreachable cluster, auth failure, missing module, duplicate id,
            a secret (credentials in a URI) among ``run_args``.
    """
    from pipeline.store.storage import refuse_secret

    for arg in run_args:
        refuse_secret(arg, "run argument")
    return _submit_entrypoint(
        build_entrypoint(job, run_args),
        address=address,
        submission_id=submission_id,
        paths=ship_paths(job, extra_modules),
    )


def _submit_entrypoint(
    entrypoint: str,
    *,
    address: str | None,
    submission_id: str | None = None,
    paths: list[Path] | None = None,
    env_vars: dict[str, str] | None = None,
) -> str:
    """Submit any shell ``entrypoint`` with ``paths`` staged as its working_dir.

    Args:
        entrypoint: the shell command run on the head node.
        address: the dashboard address.
        submission_id: an id to use instead of a generated one.
        paths: files / package dirs to ship (default: ``pipeline/`` and ``jobs/``).
        env_vars: extra environment variables for the driver and its workers.

    Returns:
        The submission id.

    Raises:
        JacpipeError: unreachable cluster, auth failure, duplicate id.
    """
    client = _client(address)
    url = client._jacpipe_url
    if paths is None:
        paths = ship_paths("builtin")
    with tempfile.TemporaryDirectory(prefix="jacpipe-ship-") as tmp:
        stage = Path(tmp) / "pkg"
        stage.mkdir()
        _stage(paths, stage)
        runtime_env: dict[str, Any] = {"working_dir": str(stage), "excludes": list(EXCLUDES)}
        if env_vars:
            runtime_env["env_vars"] = dict(env_vars)
        with _errors(url):
            try:
                return client.submit_job(
                    entrypoint=entrypoint,
                    submission_id=submission_id,
                    runtime_env=runtime_env,
                )
            except RuntimeError as exc:
                if submission_id and "already exists" in str(exc):
                    raise JacpipeError(
                        f"a job with submission id {submission_id!r} already exists on "
                        f"{url}: expected a new id; choose another or leave it out"
                    ) from None
                raise


def status(submission_id: str, address: str | None) -> str:
    """The job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED.

    Args:
        submission_id: the id returned by :func:`submit`.
        address: the dashboard address.

    Returns:
        The status name.

    Raises:
        JacpipeError: unknown id, unreachable cluster, auth failure.
    """
    return _call(address, submission_id, lambda c: str(c.get_job_status(submission_id).value))


def info(submission_id: str, address: str | None) -> dict[str, Any]:
    """Status, message and timings of one job, as a JSON-ready dict.

    Args:
        submission_id: the id returned by :func:`submit`.
        address: the dashboard address.

    Returns:
        ``submission_id, job_id, status, message, entrypoint, start_time, end_time``.

    Raises:
        JacpipeError: unknown id, unreachable cluster, auth failure.
    """
    return _call(address, submission_id, lambda c: _job_dict(c.get_job_info(submission_id)))


def logs(submission_id: str, address: str | None) -> str:
    """Everything the job's driver has printed so far.

    Args:
        submission_id: the id returned by :func:`submit`.
        address: the dashboard address.

    Returns:
        The log text.

    Raises:
        JacpipeError: unknown id, unreachable cluster, auth failure.
    """
    return _call(address, submission_id, lambda c: c.get_job_logs(submission_id))


def follow_logs(submission_id: str, address: str | None) -> Iterator[str]:
    """Yield chunks of the job's log as they are written, until the job ends.

    Args:
        submission_id: the id returned by :func:`submit`.
        address: the dashboard address.

    Yields:
        Successive pieces of the log text.

    Raises:
        JacpipeError: unknown id, unreachable cluster, auth failure.
    """
    client = _client(address)
    url = client._jacpipe_url
    with _errors(url, submission_id):
        client.get_job_info(submission_id)  # unknown id: a clear error, not a dead socket
    loop = asyncio.new_event_loop()
    agen = client.tail_job_logs(submission_id)
    try:
        while True:
            with _errors(url, submission_id):
                try:
                    chunk = loop.run_until_complete(agen.__anext__())
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    import aiohttp

                    if isinstance(exc, aiohttp.ClientError | OSError):
                        raise ConnectionError(str(exc)) from None
                    raise
            yield chunk
    finally:
        with contextlib.suppress(Exception):
            loop.run_until_complete(agen.aclose())
        loop.close()


def stop(submission_id: str, address: str | None) -> bool:
    """Ask the cluster to stop a job.

    Args:
        submission_id: the id returned by :func:`submit`.
        address: the dashboard address.

    Returns:
        True if the job was still running, False if it had already ended.

    Raises:
        JacpipeError: unknown id, unreachable cluster, auth failure.
    """
    return _call(address, submission_id, lambda c: bool(c.stop_job(submission_id)))


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    """All jobs the cluster knows, oldest first.

    Args:
        address: the dashboard address.

    Returns:
        One dict per job: ``submission_id, job_id, status, message, entrypoint,
        start_time, end_time`` (times in ms since the epoch, or None).

    Raises:
        JacpipeError: unreachable cluster, auth failure.
    """
    jobs = _call(address, None, lambda c: [_job_dict(j) for j in c.list_jobs()])
    return sorted(jobs, key=lambda j: j["start_time"] or 0)


def wait(submission_id: str, address: str | None, timeout: float | None = None) -> str:
    """Block until the job ends.

    Args:
        submission_id: the id returned by :func:`submit`.
        address: the dashboard address.
        timeout: seconds to wait at most; None waits forever.

    Returns:
        The terminal status: SUCCEEDED, FAILED or STOPPED.

    Raises:
        JacpipeError: unknown id, unreachable cluster, auth failure, or the job
            still running after ``timeout`` seconds.
    """
    client = _client(address)
    url = client._jacpipe_url
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _errors(url, submission_id):
            state = str(client.get_job_status(submission_id).value)
        if state in TERMINAL:
            return state
        if deadline is not None and time.monotonic() >= deadline:
            raise JacpipeError(
                f"job {submission_id!r} is still {state} after {timeout:g} s: expected it "
                f"to finish; follow it with `jacpipe logs {submission_id} --follow` "
                f"or stop it with `jacpipe stop {submission_id}`"
            )
        time.sleep(POLL_INTERVAL)


def _job_dict(job: Any) -> dict[str, Any]:
    """The JSON-ready facts of a ``JobInfo`` / ``JobDetails``."""
    state = getattr(job, "status", None)
    return {
        "submission_id": getattr(job, "submission_id", None),
        "job_id": getattr(job, "job_id", None),
        "status": str(getattr(state, "value", state)),
        "message": getattr(job, "message", None),
        "entrypoint": getattr(job, "entrypoint", None),
        "start_time": getattr(job, "start_time", None),
        "end_time": getattr(job, "end_time", None),
    }
