"""The ``jacpipe`` command line: thin Typer commands over :mod:`pipeline`.

Heavy libraries (torch, ray, pyarrow) are imported inside the commands, so
``jacpipe --help`` stays fast. Errors a user can cause print one line and
exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from pipeline.cli import cluster as cli_cluster
from pipeline.cli.common import JacpipeGroup, user_errors
from pipeline.cli.common import console as _console
from pipeline.cli.common import err as _err
from pipeline.cli.options import RunCommand, run_options, takes_run_options
from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import layout_of

app = typer.Typer(
    name="jacpipe",
    help=(
        "Distributed Jacobians: shard the rows of a Jacobian (or Hessian, or per-sample "
        "Jacobians) over Ray workers, stream them to Parquet, and check them against "
        "torch.autograd.functional."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    cls=JacpipeGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Start with: jacpipe jobs, then jacpipe run mlp -p n=100 -p m=100",
)


def _version(value: bool) -> None:
    if value:
        from pipeline.core import __version__

        typer.echo(f"jacpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Distributed Jacobians: shard the rows of a Jacobian (or Hessian, or per-sample
    Jacobians) over Ray workers, stream them to Parquet, and check them against
    torch.autograd.functional."""
    del version


JSON_HELP = "Print one JSON document on stdout (messages go to stderr)."
#: ``--json`` of the commands that print one JSON document.
JsonDoc = Annotated[bool, typer.Option("--json", help=JSON_HELP)]
#: ``--json`` of the listing commands.
JsonScripts = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
#: The OUT argument of the commands that read a result.
ResultFolder = Annotated[str, typer.Argument(metavar="OUT", help="Result folder of `jacpipe run`.")]


def _strict(doc: object) -> object:
    """``doc`` with non-finite floats as None: strict JSON, as every parser reads it."""
    if isinstance(doc, float):
        return doc if doc == doc and doc not in (float("inf"), float("-inf")) else None
    if isinstance(doc, dict):
        return {str(k): _strict(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_strict(v) for v in doc]
    return doc


def _echo_json(doc: object) -> None:
    """Print one JSON document on stdout (the only thing a --json command prints there)."""
    typer.echo(json.dumps(_strict(doc), indent=1, default=str, allow_nan=False))


def _stdout_to_stderr(as_json: bool) -> contextlib.AbstractContextManager[object]:
    """With --json, whatever else would reach stdout (Ray, user code) goes to stderr."""
    return contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext()


# ---------------------------------------------------------------------------
# jobs
# ---------------------------------------------------------------------------


@app.command("jobs", epilog="Example: jacpipe jobs --json")
@user_errors
def jobs_cmd(as_json: JsonScripts = False) -> None:
    """List the built-in jobs and their parameters with defaults."""
    from pipeline.problem.problem import builtin_jobs, job_doc, job_parameters, resolve_builder

    listing = []
    for name in builtin_jobs():
        builder = resolve_builder(name)
        listing.append({"job": name, "doc": job_doc(builder), "params": job_parameters(builder)})
    if as_json:
        typer.echo(json.dumps(listing, indent=1))
        return
    from rich.table import Table

    table = Table(title="built-in jobs (run one with: jacpipe run JOB -p name=value)")
    table.add_column("job", style="bold")
    table.add_column("what it computes")
    table.add_column("parameters (defaults)")
    for item in listing:
        params = "  ".join(f"{k}={v}" for k, v in item["params"].items())
        table.add_row(item["job"], item["doc"], params)
    _console().print(table)


# ---------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------

Verify = Annotated[bool, typer.Option(
    "--verify", help="Compare against torch.autograd.functional at the end.")]
VerifyRows = Annotated[int | None, typer.Option(
    "--rows", help="With --verify: sampled rows to check instead of all.")]


# The run options are RunOptions' fields (pipeline.core.options): takes_run_options
# gives run_cmd one parameter per field, which arrive in **options; only the
# CLI-only options are declared here.
@app.command("run", cls=RunCommand,
             epilog="Example: jacpipe run mlp -p n=2000 -p m=1500 --shards 8 --out out/tour "
             "--verify")
@user_errors
@takes_run_options
def run_cmd(verify: Verify = False, rows: VerifyRows = None, as_json: JsonDoc = False,
            **options: Any) -> None:
    """Compute a Jacobian sharded by output rows on Ray and write it to Parquet."""
    from pipeline.runner.driver import run_command as run
    from pipeline.store.storage import Storage

    if rows is not None and not verify:
        raise JacpipeError("--rows only applies with --verify (the rows it checks); "
                           "add --verify or drop --rows")
    opts = run_options(options)
    job = opts.job
    early = None
    if verify and rows is None:  # NOTE: [The reference while Ray starts]
        from pipeline.analysis.early import EarlyReference

        early = EarlyReference()
        run = functools.partial(run, on_checked=early.start)
    with _stdout_to_stderr(as_json), _sigterm_outside_the_run():
        summary = _run_options(run, opts)
    man = summary.manifest.to_json()
    problem, reference = early.result() if early is not None else (None, None)
    if as_json:
        _run_json(summary, verify=verify, rows=rows, job=job, problem=problem,
                  reference=reference)
        return
    shape = "x".join(str(s) for s in [man["shapes"]["total_rows"], man["shapes"]["n"]])
    typer.echo(
        f"wrote {Storage.redact(summary.out)}: {man['kind']} {shape} {man['dtype']}, "
        f"method {man['method']}, "
        f"{len(man['plan'])} shards ({summary.computed} computed, {summary.skipped} resumed) "
        f"in {man.get('wall_seconds', 0):.2f}s"
    )
    if man.get("smoothing"):
        from pipeline.analysis.smoothing import describe
        from pipeline.core.smoothing import Smoothing

        typer.echo(f"smoothed: {describe(Smoothing.from_json(man['smoothing']))}; "
                   "stderr column holds each entry's standard error")
    if verify:
        from pipeline.runner.progress import slow_phase

        with _sigterm_during_verify(summary.out), slow_phase(
                lambda s: typer.echo(s, err=True), "verifying against torch in one process",
                enabled=opts.progress):
            _compare_and_print(summary.out, rows=rows, all_rows=False, rtol=None, atol=None,
                               as_json=False, job=job, problem=problem, reference=reference)


@contextlib.contextmanager
def _sigterm_as_error(message: str) -> Iterator[None]:
    """SIGTERM inside the block: one line (``message``) and exit 143, as in the shard loop."""
    from pipeline.core.signals import SIGTERM_EXIT, SigtermSeen, Terminated, sigterm_as_interrupt

    seen = SigtermSeen()
    try:
        with sigterm_as_interrupt(seen):
            yield
    except KeyboardInterrupt as exc:
        if not (isinstance(exc, Terminated) or seen.received):
            raise
        raise JacpipeError(message, exit_code=SIGTERM_EXIT) from None


def _sigterm_during_verify(out: str) -> contextlib.AbstractContextManager[None]:
    """SIGTERM while ``run --verify`` compares: the result is complete but unchecked."""
    from pipeline.store.storage import Storage

    shown = Storage.redact(out)
    return _sigterm_as_error(
        f"terminated (SIGTERM) during --verify: the result in {shown} is complete but "
        f"unchecked; check it with `jacpipe compare {shown}`")


def _sigterm_outside_the_run() -> contextlib.AbstractContextManager[None]:
    """SIGTERM before ``run`` prepares its folder (the job building, Ray connecting): one line.

    Once the folder is prepared the driver says how far the run got
    (``Interrupted``); before, nothing was written, and a SIGTERM ended the
    command with no line (or Ray's ``sys.exit(15)``).
    """
    return _sigterm_as_error("terminated (SIGTERM) before any shard ran; rerun the same command")


def _run_options(run: Any, options: Any) -> Any:
    return run(options, lambda s: typer.echo(s, err=True))


def _run_json(summary: Any, *, verify: bool, rows: int | None, job: str, problem: Any = None,
              reference: Any = None) -> None:
    """``run --json``: the run's facts (and the --verify report) as one document."""
    from pipeline.store.storage import Storage

    man = summary.manifest.to_json()
    doc: dict[str, Any] = {
        "out": Storage.redact(summary.out), "job": man.get("job"), "params": man.get("params"),
        "kind": man["kind"], "shape": [man["shapes"]["total_rows"], man["shapes"]["n"]],
        "dtype": man["dtype"], "method": man["method"], "shards": len(man["plan"]),
        "computed": summary.computed, "resumed": summary.skipped,
        "wall_seconds": man.get("wall_seconds"), "notes": list(summary.notes),
    }
    ok = True
    if verify:
        from pipeline.analysis.compare import compare

        with _stdout_to_stderr(True), _sigterm_during_verify(summary.out):
            report = compare(summary.out, rows=rows, all_rows=False, rtol=None, atol=None,
                             job=job, problem=problem, reference=reference)
        doc["compare"] = report.to_json()
        ok = report.ok
    _echo_json(doc)
    if not ok:
        raise typer.Exit(code=1)


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------


def _compare_and_print(
    out: str, *, rows: int | None, all_rows: bool, rtol: float | None, atol: float | None,
    as_json: bool, job: str | None = None, trust_job: bool = False, problem: Any = None,
    reference: Any = None,
) -> None:
    from pipeline.analysis.compare import compare

    report = compare(out, rows=rows, all_rows=all_rows, rtol=rtol, atol=atol, job=job,
                     trust_job=trust_job, problem=problem, reference=reference)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=1))
    else:
        from rich.table import Table

        table = Table(title=f"jacpipe compare {report.out}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for name, value in _compare_rows(report):
            table.add_row(name, value)
        if report.symmetry_error is not None:
            table.add_row("symmetry max|H - Hᵀ|", f"{report.symmetry_error:.3e}")
        for key, value in report.extra.items():
            table.add_row(key, str(value))
        _console().print(table)
        for p in report.problems:
            _err(p)
        if report.nan or report.inf:
            typer.secho(
                f"warning: the result holds {report.nan} NaN and {report.inf} Inf values "
                "(see `jacpipe inspect` for the shards)", fg=typer.colors.YELLOW, err=True)
        verdict = "MATCH" if report.ok else "MISMATCH"
        typer.secho(verdict, fg=typer.colors.GREEN if report.ok else typer.colors.RED, bold=True)
    if not report.ok:
        raise typer.Exit(code=1)


def _compare_rows(report: Any) -> list[tuple[str, str]]:
    """The main rows of the ``compare`` table.

    An estimate (smoothed or stochastic) is checked within its standard
    errors (its rows are in ``report.extra``): the plain-AD tolerance rows
    would contradict them, so only its largest difference is shown here. The
    two times say which rows each covers.
    """
    pipe = f"{report.pipeline_seconds:.3f}" if report.pipeline_seconds is not None else "-"
    total = report.shape[0] if report.shape else 0
    if report.check == "exact":
        errors = [
            ("max abs error", f"{report.max_abs_error:.3e}"),
            ("max rel error", f"{report.max_rel_error:.3e}"),
            ("tolerance", f"rtol {report.rtol:.1e}, atol {report.atol:.1e}"),
            ("worst |err| / tol", f"{report.worst_ratio:.3f}"),
        ]
    else:
        errors = [("max |diff| vs reference", f"{report.max_abs_error:.3e}")]
    return [
        ("job", report.job),
        ("shape", "x".join(map(str, report.shape)) + f" {report.dtype}"),
        ("rows checked", f"{report.rows_checked} ({report.mode})"),
        *errors,
        (f"reference seconds (1 process, {report.rows_checked} rows)",
         f"{report.reference_seconds:.3f}"),
        (f"pipeline seconds (all {total} rows)", pipe),
        ("NaN / Inf in result", f"{report.nan} / {report.inf}"),
    ]


@app.command("compare", epilog="Example: jacpipe compare out/mlp --rows 64 --fd")
@user_errors
def compare_cmd(
    out: ResultFolder,
    rows: Annotated[int | None, typer.Option(
        "--rows", help="Check K sampled rows (one autograd.grad each).")] = None,
    all_rows: Annotated[bool, typer.Option(
        "--all", help="Check every row with autograd.functional.")] = False,
    rtol: Annotated[float | None, typer.Option(
        "--rtol", help="Relative tolerance [1e-5 float32, 1e-10 float64].")] = None,
    atol: Annotated[float | None, typer.Option(
        "--atol", help="Absolute tolerance [rtol * max|reference|].")] = None,
    fd: Annotated[bool, typer.Option(
        "--fd", help="Also check sampled input columns by finite differences and flag "
        "non-smooth inputs (kinks) at x.")] = False,
    fd_columns: Annotated[int, typer.Option(
        "--fd-columns", help="With --fd: input columns to check.")] = 16,
    sample: Annotated[int, typer.Option(
        "--sample", help="With --fd on a batched result: which sample.")] = 0,
    as_json: JsonScripts = False,
    job: Annotated[str | None, typer.Option(
        "--job", help="The 'module:function' job that computed OUT: confirms that it may be "
        "imported and run to build the reference (built-in jobs need nothing).")] = None,
    trust_job: Annotated[bool, typer.Option(
        "--trust-job", help="Import and run whatever 'module:function' job the result "
        "folder names.")] = False,
) -> None:
    """Check a result against torch.autograd.functional in one process; exit 1 on mismatch.

    The whole reference is computed when it fits in memory, else --rows K
    sampled rows (64 by default). With --fd, central finite differences are
    compared with the stored AD columns, and forward/backward one-sided
    differences at two step sizes reveal inputs along which the function has
    a kink at x (AD is then only one of the one-sided derivatives). Steps:
    h_j = eps^(1/3) * max(1, |x_j|), eps of the dtype the differences run in.
    """
    if rows is not None and all_rows:
        raise JacpipeError("give --rows K or --all, not both")
    if as_json:
        _compare_json(out, rows=rows, all_rows=all_rows, rtol=rtol, atol=atol,
                      fd=(fd_columns, sample) if fd else None, job=job, trust_job=trust_job)
        return
    failed = False
    try:
        _compare_and_print(out, rows=rows, all_rows=all_rows, rtol=rtol, atol=atol,
                           as_json=False, job=job, trust_job=trust_job)
    except typer.Exit as exc:
        if not fd or exc.exit_code != 1:
            raise
        failed = True
    if fd:
        failed = _fd_and_print(out, columns=fd_columns, sample=sample, as_json=False,
                               job=job, trust_job=trust_job) or failed
    if failed:
        raise typer.Exit(code=1)


def _compare_json(
    out: str, *, rows: int | None, all_rows: bool, rtol: float | None, atol: float | None,
    fd: tuple[int, int] | None, job: str | None = None, trust_job: bool = False,
) -> None:
    """``compare --json``: the report; with --fd one document ``{"compare", "fd", "ok"}``."""
    from pipeline.analysis.compare import compare, fd_report

    with _stdout_to_stderr(True):
        report = compare(out, rows=rows, all_rows=all_rows, rtol=rtol, atol=atol, job=job,
                         trust_job=trust_job)
        doc = report.to_json()
        ok = report.ok
        if fd is not None:
            fdr = fd_report(out, columns=fd[0], sample=fd[1], job=job, trust_job=trust_job)
            ok = ok and fdr.ok
            doc = {"compare": doc, "fd": fdr.to_json(), "ok": ok}
    _echo_json(doc)
    if not ok:
        raise typer.Exit(code=1)


def _fd_and_print(out: str, *, columns: int, sample: int, as_json: bool,
                  job: str | None = None, trust_job: bool = False) -> bool:
    """Print the finite-difference report; True when AD and FD disagree."""
    from pipeline.analysis.compare import fd_report

    report = fd_report(out, columns=columns, sample=sample, job=job, trust_job=trust_job)
    if as_json:
        typer.echo(report.dumps())
        return not report.ok
    from rich.table import Table

    table = Table(title=f"finite differences ({report.fd_dtype}; {report.fd_dtype_reason})")
    for col in report.HEADER:
        table.add_column(col, justify="right")
    for row in report.rows():
        table.add_row(*row)
    _console().print(table)
    for note in report.notes:
        typer.echo(f"note: {note}")
    if report.nonsmooth_inputs:
        typer.secho(
            "non-smooth at x along inputs "
            + ", ".join(map(str, report.nonsmooth_inputs))
            + ": f is not differentiable there; AD gives one one-sided derivative",
            fg=typer.colors.YELLOW,
        )
    else:
        typer.echo("no non-smooth inputs found among the checked columns")
    if report.disagreeing_columns:
        _err("AD and FD disagree on input columns "
             + ", ".join(map(str, report.disagreeing_columns)))
    return not report.ok


# ---------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------


@app.command("inspect", epilog="Example: jacpipe inspect out/mlp --plot out/J.svg --svd 5")
@user_errors
def inspect_cmd(
    out: ResultFolder,
    as_json: JsonDoc = False,
    plot: Annotated[str | None, typer.Option(
        "--plot", help="Write a PNG, SVG or PDF (by extension): heatmap (dense, block max-abs "
        "downsampled) or spy plot (sparse), with row/column norm profiles.")] = None,
    svd: Annotated[int | None, typer.Option(
        "--svd", help="Top K singular values (and a condition estimate) by randomized "
        "range-finding over streamed row blocks.")] = None,
) -> None:
    """Shape, dtype, shards, timings, norms, zeros and NaN/Inf counts of a result."""
    from pipeline.analysis.inspection import summarize

    info = summarize(out)
    if plot:
        from pipeline.analysis.inspection import plot_result

        info["plot"] = plot_result(out, plot)
    if svd is not None:
        from pipeline.analysis.inspection import svd_result

        info["svd"] = svd_result(out, svd).to_json()
    if as_json:
        _echo_json(info)
    else:
        from rich.table import Table

        table = Table(title=f"jacpipe inspect {info['out']}")
        table.add_column("fact")
        table.add_column("value", justify="right")
        zf = info["zero_fraction"]
        for name, value in [
            ("job", f"{info['job']} {json.dumps(info['params'])}"),
            ("kind / layout / method", f"{info['kind']} / {info['layout']} / {info['method']}"),
            ("shape (rows x cols)" if info["kind"] != "batched" else "shape (samples x (m x n))",
             f"{info['display_shape']} {info['dtype']}"),
            ("full shape", "x".join(map(str, info["full_shape"]))),
            ("status", str(info["status"])),
            ("shards committed / planned",
             f"{info['shards_committed']} / {info['shards_planned']}"),
            ("shard seconds total / median / max",
             " / ".join(str(info["shard_seconds"][k]) for k in ("total", "median", "max"))),
            ("wall seconds", str(info["wall_seconds"])),
            ("nodes", ", ".join(n[:12] for n in info["nodes"])),
            ("devices", ", ".join(info["devices"])),
            ("Frobenius norm", f"{info['frobenius_norm']:.6g}"),
            ("max |entry|", f"{info['max_abs']:.6g}"),
            ("zero fraction", "-" if zf is None else f"{zf:.4f}"),
            *([("nonzeros / density / colours",
                f"{info['nnz']} / {info['density']:.3g} / {info['colours']} "
                f"({info['coloring_mode']} mode)")]
              if not layout_of(info["layout"]).fixed_width else []),
            *([("sparsity pattern from", f"{info['pattern_source']}" + (
                f" in {info['sparsity_detection']['seconds']}s"
                if info["sparsity_detection"] else ""))] if info["pattern_source"] else []),
            ("NaN / Inf", f"{info['nan']} / {info['inf']}"),
        ]:
            table.add_row(name, value)
        _console().print(table)
        shards = Table(title="shards")
        for col in ("index", "rows", "seconds", "node", "device", "attempt", "NaN/Inf"):
            shards.add_column(col, justify="right")
        for s in info["shards"][:50]:
            shards.add_row(str(s["index"]), str(s["rows"]), f"{s['seconds']:.3f}",
                           str(s["node_id"])[:12], str(s["device"]), str(s["attempt"]),
                           f"{s['nan'] or 0}/{s['inf'] or 0}")
        if len(info["shards"]) > 50:
            shards.add_row("...", f"{len(info['shards']) - 50} more", "", "", "", "", "")
        _console().print(shards)
        _print_kind_facts(info)
        if "svd" in info:
            sv = info["svd"]
            typer.echo("top singular values: "
                       + ", ".join(f"{v:.6g}" for v in sv["singular_values"]))
            if sv["condition_estimate"] is not None or sv["singular"]:
                typer.echo(f"condition estimate: {sv['condition_estimate'] or 'inf (singular)'}")
            typer.echo(f"({sv['note']})")
        if "plot" in info:
            typer.echo(f"wrote {info['plot']}")
        _print_problems(info)
        if info["stray_files"]:
            typer.secho(
                f"warning: {len(info['stray_files'])} file(s) look like parts but are not in "
                f"the plan ({', '.join(info['stray_files'][:3])}); readers of the folder "
                "(pandas, pyarrow.dataset, Polars) would count their rows; "
                "a resume moves them aside",
                fg=typer.colors.YELLOW, err=True)
    if info["problems"]:
        raise typer.Exit(code=1)

def _print_kind_facts(info: dict) -> None:
    """What a smoothed or per-point result adds to ``inspect``'s table."""
    if "smoothing" in info:
        _print_smoothing(info["smoothing"])
    if "operator" in info:
        _print_operator(info["operator"])


def _print_operator(op: dict) -> None:
    """A per-point result's operator options and statistics over its points (``inspect``)."""
    typer.echo(f"operator options: {json.dumps(op['options']) if op['options'] else 'exact'}")
    for column, what in (("values", "operator"), ("value", "fn"), ("stderr", "standard error")):
        if op.get(column):
            st = op[column]
            typer.echo(f"{what:>14}: " + ", ".join(
                f"{k} {v:.6g}" for k, v in st.items() if v is not None))


def _print_smoothing(sm: dict) -> None:
    """The smoothing of a result and its error bars (``inspect``)."""
    typer.echo(f"smoothed: {sm['describe']}")
    rel = sm["relative_stderr"]
    typer.echo(f"standard error: max {sm['stderr_max']:.3e}, median {sm['stderr_median']:.3e}"
               + (f" (max / max|entry| = {rel:.2e})" if rel is not None else ""))
    typer.echo("largest entries: " + ", ".join(
        f"J[{r}, {c}] = {v:.4g} ± {e:.2g}" for r, c, v, e in sm["largest"]))

@app.command("export", epilog="Example: jacpipe export out/mlp out/J.npy")
@user_errors
def export_cmd(
    out: ResultFolder,
    file: Annotated[str, typer.Argument(
        metavar="FILE", help="File to write: .npy (dense, streamed through a memory map: any "
        "size) or .npz (scipy.sparse CSR).")],
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace FILE if it exists (otherwise refused).")] = False,
    as_json: JsonDoc = False,
) -> None:
    """Export a result to one NumPy .npy or SciPy sparse .npz file."""
    from pipeline.store.export import export

    done = export(out, file, overwrite=overwrite)
    for note in done.notes:
        typer.echo(f"note: {note}", err=True)
    if as_json:
        _echo_json({"file": done.path, "shape": list(done.shape), "dtype": done.dtype,
                    "nnz": done.nnz})
        return
    nnz = "" if done.nnz is None else f", {done.nnz} stored entries"
    typer.echo(f"wrote {done.path}: {' x '.join(map(str, done.shape))} {done.dtype}{nnz}")


def _print_problems(info: dict[str, Any]) -> None:
    """Shards not yet committed as one summary line; missing or corrupt ones by name.

    (The JSON's ``problems`` lists every one.)
    """
    pending = [p for p in info["problems"] if p.endswith(": not committed")]
    broken = [p for p in info["problems"] if not p.endswith(": not committed")]
    for p in broken[:10]:
        _err(p)
    if len(broken) > 10:
        _err(f"... and {len(broken) - 10} more missing or corrupt shards (see --json)")
    if pending:
        _err(f"{info['shards_committed']} of {info['shards_planned']} shards committed; "
             "rerun the same command to resume")


# The cluster commands (Ray Jobs API): defined in cli_cluster, registered here.
app.command(
    "submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Example: jacpipe submit mlp -p n=4000 --shards 16 --address http://HEAD:8265 --wait",
)(user_errors(cli_cluster.submit_cmd))
app.command("status", epilog="Example: jacpipe status raysubmit_XXXX --json")(
    user_errors(cli_cluster.status_cmd))
app.command("logs", epilog="Example: jacpipe logs raysubmit_XXXX --follow")(
    user_errors(cli_cluster.logs_cmd))
app.command("stop", epilog="Example: jacpipe stop raysubmit_XXXX --wait")(
    user_errors(cli_cluster.stop_cmd))
app.command("list", epilog="Example: jacpipe list --address http://HEAD:8265")(
    user_errors(cli_cluster.list_cmd))


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
             epilog="Example: jacpipe bench --quick --only engine")
def bench_cmd(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option(
        "--quick", help="Small sizes: a smoke run, under a minute each.")] = False,
    only: Annotated[str | None, typer.Option(
        "--only", help="Comma-separated subset: engine, parquet_io, end_to_end, memory, "
        "batched_hessian, sparse.")] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Exit 1 when a target is missed, too.")] = False,
) -> None:
    """Side-by-side benchmarks against the torch baselines; prints medians, ratios, MET/MISSED.

    Each benchmark runs in its own process from the repository root and writes
    benchmarks/results/NAME.json. Same as `make bench` or `python -m benchmarks`.
    """

    if os.path.isdir("benchmarks") and os.getcwd() not in sys.path:
        # Benchmarks are not installed: they run from a checkout (console
        # scripts do not put the current directory on sys.path).
        sys.path.insert(0, os.getcwd())
    try:
        from benchmarks.run_all import main as run_all
    except ImportError:
        _err("the benchmarks package is not installed: run from a jacpipe checkout")
        raise typer.Exit(code=2) from None
    argv = (["--quick"] if quick else []) + (["--only", only] if only else [])
    argv += (["--strict"] if strict else []) + list(ctx.args)
    raise typer.Exit(code=run_all(argv))


def main() -> None:
    """Console-script entry point; it ends the process (NOTE: [A quick exit]).

    An unexpected exception (a bug, a full disk) is still one line; set
    ``JACPIPE_DEBUG=1`` to see its traceback.
    """

    try:
        app(prog_name="jacpipe")
    except SystemExit as exc:
        _exit_quickly(exc.code)
    except Exception as exc:  # noqa: BLE001 - the last resort: one line, exit 1
        if os.environ.get("JACPIPE_DEBUG"):
            raise
        import traceback

        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {tb[-1].filename}:{tb[-1].lineno}" if tb else ""
        _err(f"{type(exc).__name__}: {exc}{where} (set JACPIPE_DEBUG=1 for the traceback)")
        sys.exit(1)


def _exit_quickly(code: Any) -> None:
    """End the process with ``code`` after the exit handlers, without the interpreter's teardown.

    NOTE: [A quick exit]
        Once a command has ended, freeing the modules it loaded (torch, Ray,
        pyarrow) took the interpreter 1.1-2.0 s (measured on 2 cores), seconds
        that ``make run`` paid after its last line. Here the ``atexit``
        handlers run (an embedded Ray stops, logging flushes), the standard
        streams are flushed, and ``os._exit`` skips the rest. A thread still
        at work (not a daemon) gets the ordinary exit, which waits for it.
    """
    import atexit
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate()
           if t is not threading.main_thread()):
        sys.exit(code)
    if isinstance(code, str):  # sys.exit("message"): the message on stderr, status 1
        _err(code)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more to say
            pass
    os._exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
