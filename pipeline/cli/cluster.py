"""``jacpipe submit | status | logs | stop | list``: runs on a Ray cluster via its Jobs API.

Thin Typer commands over :mod:`pipeline.runner.submit`; ``pipeline/cli.py`` registers
them on its app (this module never imports it). Ray and pyarrow are imported inside the
commands, so ``jacpipe --help`` stays fast. Errors a user can cause (bad run
options, unreachable dashboard, missing token, unknown id) are one line and a
non-zero exit, through ``cli.py``'s ``user_errors``.

``submit`` forwards every ``jacpipe run`` option unchanged (so new ``run``
options work without touching this file), after checking them with ``run``'s
own parser. It always passes an absolute ``--out``: the job runs in a temporary
working directory on the head node, where a relative path would vanish.
"""

from __future__ import annotations

import os
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli.common import complete_job
from pipeline.core.errors import JacpipeError

ADDRESS_HELP = (
    "Dashboard (Jobs API) address of the head node, http://HEAD:8265 "
    "(default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS)."
)
Address = Annotated[str | None, typer.Option("--address", help=ADDRESS_HELP, show_default=False)]


# ---------------------------------------------------------------------------
# The local record of submissions: what ID completes to
# ---------------------------------------------------------------------------

#: How many submissions the record keeps (the newest).
_REMEMBERED = 200


def submissions_file() -> Path:
    """This user's record of submissions: ``$XDG_STATE_HOME/jacpipe/submissions.jsonl``.

    (``~/.local/state`` when ``XDG_STATE_HOME`` is not set.) One JSON object a
    line: ``id``, ``job``, ``address`` (as given, None for the default) and ``at``.
    """
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                            "state")
    return Path(base) / "jacpipe" / "submissions.jsonl"


def remember_submission(sid: str, job: str, address: str | None) -> None:
    """Add a submission to :func:`submissions_file` (atomically; the newest 200 stay).

    Only completion reads it: a record that cannot be written (a read-only
    home) costs the completion of this id, not the submission.
    """
    import json

    path = submissions_file()
    entry = {"id": sid, "job": job, "address": address,
             "at": datetime.now().isoformat(timespec="seconds")}
    try:
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
        lines = [*lines, json.dumps(entry)][-_REMEMBERED:]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except OSError:
        return


def complete_submission(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion of ID: the submissions recorded here, newest first, with their job.

    Nothing is asked of the cluster (completing stays instant and works offline).
    """
    import json

    try:
        lines = submissions_file().read_text(errors="replace").splitlines()
    except OSError:
        return []
    found: dict[str, str] = {}
    for line in reversed(lines):
        try:
            entry = json.loads(line)
            sid = entry["id"]
        except (ValueError, TypeError, KeyError):
            continue  # a damaged line: the others still complete
        if isinstance(sid, str) and sid.startswith(incomplete) and sid not in found:
            where = entry.get("address") or "the default address"
            found[sid] = f"{entry.get('job', '?')}, submitted {entry.get('at', '?')} to {where}"
    return list(found.items())


SubmissionId = Annotated[str, typer.Argument(
    metavar="ID", help="Submission id printed by `jacpipe submit`.",
    autocompletion=complete_submission)]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]

#: ``jacpipe run`` options whose value is the output folder.
_OUT_FLAGS = ("--out", "-o")
#: Ray SDK loggers whose INFO lines (package upload, websocket closed) are noise here.
_CHATTY_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)


def _quiet_ray_sdk() -> None:
    import logging

    import ray.dashboard.modules.job.sdk  # noqa: F401 - it sets INFO on import: import first

    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------
# submit
# ---------------------------------------------------------------------------


def submit_cmd(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(
        metavar="JOB", autocompletion=complete_job,
        help="Built-in job name or 'module:function' (local modules are shipped).")],
    address: Address = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Stream the job's log until it ends; exit 1 unless it "
        "SUCCEEDED.")] = False,
    submission_id: Annotated[str | None, typer.Option(
        "--submission-id", help="Use this id instead of a generated one.",
        show_default=False)] = None,
    extra_module: Annotated[list[str] | None, typer.Option(
        "--extra-module", help="Another local module or .py file the job imports "
        "(repeatable); shipped with pipeline/ and jobs/.", show_default=False)] = None,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", help="With --wait: give up waiting after this many seconds "
        "(the job keeps running).", show_default=False)] = None,
) -> None:
    """Run `jacpipe run JOB ...` (any run options) on a Ray cluster through its Jobs API.

    Every option of `jacpipe run` is forwarded (-p, --out, --shards, --verify and
    the others); --address here is the cluster's dashboard. A relative --out is
    made absolute: it must be a path every node can reach, or s3://bucket/prefix.
    Prints the submission id; follow the job with `jacpipe logs ID --follow`.
    """
    from pipeline.runner import submit as sub

    run_args = list(ctx.args)
    params = _parse_run_args(ctx, job, run_args)
    check_locally(job, params)  # nothing is sent before the job, params and options pass
    _quiet_ray_sdk()
    run_args, out = _absolute_out(job, run_args, params)
    sid = sub.submit(
        job, run_args, address=address, submission_id=submission_id,
        extra_modules=list(extra_module or []),
    )
    remember_submission(sid, job, address)
    typer.echo(sid)
    typer.echo(f"output: {out}", err=True)
    if not wait:
        typer.echo(f"follow it with: jacpipe logs {sid} --follow", err=True)
        return
    _wait_streaming(sid, address, timeout=timeout)


def _run_command(ctx: typer.Context) -> Any:
    """The click command behind `jacpipe run` (a sibling of this command), to parse with."""
    root = ctx.find_root()
    return root.command.get_command(root, "run")  # type: ignore[attr-defined]


def _parse_run_args(ctx: typer.Context, job: str, args: list[str]) -> dict[str, Any]:
    """The options `jacpipe run JOB ARGS` would get; one clear error if it would not parse."""
    for arg in args:
        if arg == "--address" or arg.startswith("--address="):
            raise JacpipeError(
                "--address was given twice: `jacpipe submit` takes the dashboard address "
                "once, and runs the job on the cluster with --address auto"
            )
    try:
        return dict(_run_command(ctx).make_context("jacpipe run", [job, *args]).params)
    except typer.TyperException as exc:  # typer's (vendored) click usage errors
        text = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise JacpipeError(
            f"run options {' '.join(args)!r}: {text}; "
            "see `jacpipe run --help`"
        ) from None


def check_locally(job: str, params: dict[str, Any]) -> None:
    """Refuse here what `jacpipe run` would refuse on the cluster before computing.

    Args:
        job: the job spec.
        params: the parsed options of `jacpipe run JOB ...` (by RunOptions field name).

    Raises:
        JacpipeError: an unknown job or module, a bad ``-p`` parameter (unknown
            name, value of the wrong type), or a bad run option; exit code 2.
    """
    from pipeline.cli.options import run_options
    from pipeline.problem.problem import parse_params, resolve_builder

    options = run_options({**params, "job": job})
    parse_params(resolve_builder(job), options.params)
    options.check()


def _absolute_out(job: str, args: list[str], params: dict[str, Any]) -> tuple[list[str], str]:
    """``args`` with ``--out`` made absolute (added when missing), and that output.

    The job's working directory on the cluster is a temporary folder, so a
    relative ``--out`` (or run's default ``out/JOB``) would be lost there.
    """
    from pipeline.store.folder import default_out

    out = params.get("out") or default_out(job)
    if "://" in out and not out.startswith("file://"):
        from pipeline.store.storage import refuse_secret

        refuse_secret(out, "--out")
    else:
        out = os.path.abspath(os.path.expanduser(out.removeprefix("file://")))
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _OUT_FLAGS:
            skip = True
        elif not arg.startswith(("--out=", "-o")):
            kept.append(arg)
    return [*kept, "--out", out], out


def _wait_streaming(sid: str, address: str | None, *, timeout: float | None) -> None:
    """Print the job's log as it comes while polling its status until it ends.

    The status poll decides when the job is over (reliable); the log stream is
    best effort, in a daemon thread that stops printing once we return.
    """
    from pipeline.runner import submit as sub

    started = time.monotonic()
    done = threading.Event()
    streamer = threading.Thread(
        target=_print_log_stream, args=(sid, address, done), daemon=True
    )
    streamer.start()
    try:
        state = sub.wait(sid, address, timeout=timeout)
        streamer.join(timeout=10)  # the stream ends with the job: let it print the tail
    except KeyboardInterrupt:
        raise JacpipeError(
            f"stopped waiting; job {sid} keeps running on the cluster: "
            f"`jacpipe stop {sid}` ends it", exit_code=130,
        ) from None
    finally:
        done.set()
    seconds = time.monotonic() - started
    if state != "SUCCEEDED":
        message = (sub.info(sid, address).get("message") or "").strip().splitlines()
        # Ray appends ", last available logs ...:" and the log itself: we streamed it.
        first = message[0].split(", last available logs")[0].rstrip(": ") if message else ""
        why = f": {_masked(first)}" if first else ""
        last = failure_line(sid, address, "\n".join(message)) if state == "FAILED" else None
        why += f" ({last})" if last else ""
        raise JacpipeError(
            f"job {sid} {state} after {seconds:.1f} s{why}; see `jacpipe logs {sid}`",
            exit_code=1,
        )
    typer.echo(f"job {sid} SUCCEEDED in {seconds:.1f} s", err=True)


def _print_log_stream(sid: str, address: str | None, done: threading.Event) -> None:
    try:
        for chunk in _follow(sid, address):
            if done.is_set():
                return
            typer.echo(chunk, nl=False, err=True)  # stdout keeps only the id
    except Exception:  # noqa: BLE001 - best effort: the status poll reports what matters
        return


def _follow(sid: str, address: str | None) -> Any:
    from pipeline.runner import submit as sub

    _quiet_ray_sdk()
    return sub.follow_logs(sid, address)


# ---------------------------------------------------------------------------
# status, logs, stop, list
# ---------------------------------------------------------------------------


def _masked(text: str | None) -> str:
    from pipeline.store.storage import Storage

    return Storage.redact(text or "")


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def status_cmd(sid: SubmissionId, address: Address = None, as_json: AsJson = False) -> None:
    """Status of a submitted job: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    import json

    from pipeline.runner import submit as sub

    info = sub.info(sid, address)
    info["entrypoint"] = _masked(info.get("entrypoint"))
    if info["status"] == "FAILED":
        info["error"] = failure_line(sid, address, info.get("message"))
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    typer.echo(f"{sid}: {info['status']}")
    if info.get("message"):
        typer.echo(f"  {_masked(info['message']).strip().splitlines()[0]}")
    if info.get("error"):
        typer.echo(f"  last error: {info['error']}")
    ended = f", ended {_when(info['end_time'])}" if info.get("end_time") else ""
    typer.echo(f"  started {_when(info.get('start_time'))}{ended}")


def last_error_line(text: str) -> str | None:
    """The line of a log that says why a job failed: the last ``error:`` line, else
    the last ``...Error``/``...Exception`` line; None when there is neither.

    Args:
        text: a job's log, or the message Ray stores with a failed job.

    Returns:
        That line, stripped (credentials in URIs masked), or None.
    """
    import re

    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for pattern in (r"^error:", r"\b\w*(Error|Exception)\b"):
        for line in reversed(lines):
            if re.search(pattern, line):
                return _masked(line)
    return None


def failure_line(sid: str, address: str | None, message: str | None) -> str | None:
    """Why a failed job failed, from its message, else from the tail of its log.

    Args:
        sid: the submission id.
        address: the dashboard address.
        message: the message Ray stores with the job (may hold the log's tail).

    Returns:
        One line, or None when neither says.
    """
    from pipeline.runner import submit as sub

    line = last_error_line(message or "")
    if line is None:
        try:
            line = last_error_line(sub.logs(sid, address)[-20000:])
        except JacpipeError:
            return None
    return line


def logs_cmd(
    sid: SubmissionId,
    address: Address = None,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing new output until the job ends.")] = False,
) -> None:
    """Print what a submitted job has written to its log."""
    from pipeline.runner import submit as sub

    if not follow:
        typer.echo(sub.logs(sid, address), nl=False)
        return
    try:
        for chunk in _follow(sid, address):
            typer.echo(chunk, nl=False)
    except KeyboardInterrupt:
        typer.echo(f"(stopped following; job {sid} keeps running)", err=True)


def stop_cmd(
    sid: SubmissionId,
    address: Address = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Wait until the job has stopped.")] = False,
) -> None:
    """Stop a submitted job (its driver and its shard tasks)."""
    from pipeline.runner import submit as sub

    if not sub.stop(sid, address):
        typer.echo(f"job {sid} had already ended: {sub.status(sid, address)}")
        return
    typer.echo(f"stop requested for job {sid}")
    if wait:
        typer.echo(f"job {sid}: {sub.wait(sid, address, timeout=120)}")


def list_cmd(address: Address = None, as_json: AsJson = False) -> None:
    """List the jobs the cluster knows, oldest first."""
    import json

    from pipeline.runner import submit as sub

    jobs = sub.list_jobs(address)
    for job in jobs:
        job["entrypoint"] = _masked(job.get("entrypoint"))
        job["message"] = _masked(job.get("message"))
    if as_json:
        typer.echo(json.dumps(jobs, indent=1))
        return
    if not jobs:
        typer.echo("no jobs on this cluster")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"jobs on {sub.normalize_address(address)}")
    table.add_column("submission id", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("started")
    table.add_column("entrypoint")
    for job in jobs:
        entry = job["entrypoint"] or ""
        entry = entry.removeprefix("python -m pipeline.cli ").replace(" --address auto", "")
        table.add_row(str(job["submission_id"] or job["job_id"]), job["status"],
                      _when(job["start_time"]), entry)
    Console().print(table)
