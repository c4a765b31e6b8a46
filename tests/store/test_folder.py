"""``pipeline.store.folder``: locks, resume, stray files and commits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline import read_jacobian
from pipeline.cli import app
from pipeline.core.errors import JacpipeError
from pipeline.core.options import RunOptions
from pipeline.core.shapes import Shapes
from pipeline.core.shard import ShardResult
from pipeline.runner import driver as runner
from pipeline.store.folder import ResultFolder
from pipeline.store.manifest import Manifest
from pipeline.store.storage import Storage
from tests.clitools import error_line as _one_error
from tests.manifests import read_doc
from tests.store.results import ROWS, N, _swap_part, write_result

cli = CliRunner()


def _run(*args: object):
    return cli.invoke(app, [str(a) for a in args])


def test_one_run_per_folder(tmp_path):
    from pipeline.store.folder import ResultFolder

    first, second = ResultFolder(Storage(str(tmp_path))), ResultFolder(Storage(str(tmp_path)))
    first.lock("run-a")
    with pytest.raises(JacpipeError, match=r"in use by another run \(run run-a, pid"):
        second.lock("run-b")
    first.unlock()
    second.lock("run-b")  # free again
    second.unlock()


def test_a_read_only_out_folder_is_one_line_naming_the_permission(tmp_path, monkeypatch):
    import errno

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    folder = ResultFolder(Storage(str(tmp_path)))
    monkeypatch.setattr(os, "open", refuse)  # root ignores chmod: refuse as a read-only folder
    with pytest.raises(JacpipeError) as caught:
        folder.lock("run-a")
    message = str(caught.value)
    assert message.startswith(f"--out {tmp_path}: no permission to write in the folder")
    assert "cannot write .lock: Permission denied" in message and "chmod u+w" in message
    assert caught.value.exit_code == 2


def test_an_out_name_too_long_for_the_file_system_is_one_line(tmp_path):
    long = tmp_path / ("a" * 300)
    result = _run("run", "mlp", "-p", "n=4", "-p", "m=4", "--executor", "local", "--out", long)
    line = _one_error(result)
    assert result.exit_code == 2
    assert "the name is too long for the file system (File name too long)" in line
    assert "choose a shorter --out" in line and "(set JACPIPE_DEBUG=1" not in line
    assert len(line) < 300


@pytest.mark.slow
def test_a_killed_runs_lock_does_not_block(tmp_path):
    code = ("import os, sys; from pipeline.store.folder import ResultFolder; "
            "from pipeline.store.storage import Storage; "
            f"ResultFolder(Storage({str(tmp_path)!r})).lock('dead'); os._exit(9)")
    done = subprocess.run([sys.executable, "-c", code], env=dict(os.environ,
                          PYTHONPATH=os.getcwd()), timeout=60)
    assert done.returncode == 9 and (tmp_path / ".lock").exists()
    from pipeline.store.folder import ResultFolder

    folder = ResultFolder(Storage(str(tmp_path)))
    folder.lock("alive")  # the kernel dropped the dead process's flock
    folder.unlock()


def test_stray_parts_are_reported_and_moved_aside_on_resume(ray_session, tmp_path):
    out = tmp_path / "out"
    opts = RunOptions(job="mlp", params=["n=20", "m=30", "hidden=8"], shards=3, out=str(out),
                      progress=False)
    runner.run(opts, echo=lambda _: None)
    full = read_jacobian(out)
    (out / "part-00099.parquet").write_bytes((out / "part-00001.parquet").read_bytes())
    info = json.loads(_run("inspect", out, "--json").output)
    assert info["stray_files"] == ["part-00099.parquet"]
    lines: list[str] = []
    runner.run(opts, echo=lines.append)
    assert any("moved 1 file(s)" in line and "_stray" in line for line in lines), lines
    assert (out / "_stray" / "part-00099.parquet.stray").exists()
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    assert len(pd.read_parquet(out)) == 30 and ds.dataset(out).count_rows() == 30
    # Polars reads "_" folders too: it refuses the folder rather than count the stray's rows.
    with pytest.raises(Exception, match="different file extensions"):
        pl.read_parquet(out)
    shutil.rmtree(out / "_stray")
    assert pl.read_parquet(out).height == 30
    np.testing.assert_array_equal(read_jacobian(out), full)


def test_a_file_name_that_is_not_utf8_is_listed_escaped_and_strays_still_warned(tmp_path):
    out = tmp_path / "out"
    write_result(str(out))
    with open(os.fsencode(out) + b"/part-\xff.parquet", "wb") as f:
        f.write(b"not utf-8")
    (out / "part-00099.parquet").write_bytes((out / "part-00001.parquet").read_bytes())
    result = _run("inspect", out, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["stray_files"] == ["part-00099.parquet", "part-\\xff.parquet"]
    shown = _run("inspect", out)
    assert "warning: 2 file(s) look like parts" in shown.output and "Traceback" not in shown.output
    folder = ResultFolder(Storage(str(out)))
    folder._move_strays(3)  # what a resume does: the undecodable name moves aside too
    assert sorted(os.listdir(os.fsencode(out / "_stray"))) == [
        b"part-00099.parquet.stray", b"part-\xff.parquet.stray"]
    assert "part-\\xff.parquet" in folder.notes[0]


def test_folder_problems_exit_2(tmp_path):
    (tmp_path / "o" / "_manifest.parquet").mkdir(parents=True)
    result = _run("inspect", tmp_path / "o")
    assert result.exit_code == 2 and "is a folder" in _one_error(result)
    result = _run("run", "mlp", "--out", "")
    assert result.exit_code == 2 and "--out is empty" in _one_error(result)


def test_a_part_of_another_shape_with_a_matching_checksum_is_caught_and_recomputed(
    tmp_path: Path,
) -> None:
    """Part 1 replaced by a well-formed part of other rows/width, its manifest entry updated."""
    write_result(str(tmp_path))
    other = tmp_path / "other"
    write_result(str(other), n=N + 2, rows=ROWS)
    _swap_part(tmp_path, 1, other / "part-00001.parquet")
    with pytest.raises(JacpipeError, match="holds double rows of width 7, the manifest says "
                                           "float64 x 5"):
        read_jacobian(tmp_path)
    # rows 0..4 live in part 0 only: still readable
    np.testing.assert_array_equal(read_jacobian(tmp_path, rows=[0, 3]).shape, (2, N))
    # resume trusts only parts that check out (folder._trusted_shards uses check())
    keep = ResultFolder(Storage(str(tmp_path)))._trusted_shards()
    assert sorted(keep) == [0, 2]


def test_an_interrupt_during_a_commit_never_drops_a_logged_commit(tmp_path: Path, monkeypatch):
    """SIGTERM / Ctrl-C raised as the log line is fsynced: the final manifest still has it.

    The final manifest replaces the commit log, so every logged commit must be
    in the driver's memory first (seen once in CI: 2 logged, 1 kept).
    """
    from pipeline.store import folder as folder_mod

    write_result(str(tmp_path / "ref"))
    storage = Storage(str(tmp_path / "out"))
    manifest = Manifest(
        job="tests.userjobs:matrix_io", params={}, fingerprint={}, method="rev", layout="dense",
        plan=[(0, 6), (6, 12)], shapes=Shapes("jacobian", (N,), (ROWS,), None, "float64"),
        run_id="r2",
    )
    folder = ResultFolder(storage)
    folder.prepare(manifest, resume=False, overwrite=True)
    real = folder_mod.append_commit

    def interrupted(storage_, result):
        real(storage_, result)  # the line is in the log...
        raise KeyboardInterrupt  # ...and the signal lands before anything else runs

    monkeypatch.setattr(folder_mod, "append_commit", interrupted)
    ref = read_doc(tmp_path / "ref")["shards"][0]
    with pytest.raises(KeyboardInterrupt):
        folder.commit(ShardResult(0, 0, 6, ref["file"], 6, ref["checksum"], ref["bytes"]))
    folder.finish("interrupted")
    assert [s["index"] for s in read_doc(tmp_path / "out")["shards"]] == [0]


def test_a_rerun_with_another_compression_is_refused_and_the_manifest_keeps_the_parts_codec(
    tmp_path: Path,
) -> None:
    """A finished zstd folder rerun with --compression lz4 used to say "resumed" and claim lz4."""
    import pyarrow.parquet as pq

    out = tmp_path / "out"
    base = ["run", "mlp", "-p", "n=6", "-p", "m=8", "-p", "hidden=4", "--shards", "2",
            "--out", out, "--executor", "local", "--no-progress"]
    assert _run(*base).exit_code == 0
    result = _run(*base, "--compression", "lz4")
    line = _one_error(result)
    assert result.exit_code == 2, result.output
    assert "written with --compression zstd" in line and "--overwrite" in line, line
    assert read_doc(out)["options"]["compression"] == "zstd"
    # --overwrite rewrites every part with the new codec, and the manifest says so
    assert _run(*base, "--compression", "lz4", "--overwrite").exit_code == 0
    assert read_doc(out)["options"]["compression"] == "lz4"
    for part in sorted(out.glob("part-*.parquet")):
        assert pq.ParquetFile(part).metadata.row_group(0).column(0).compression == "LZ4"


def _rates(codec: str):
    """Injected probe results under which ``--compression auto`` chooses ``codec``."""
    from pipeline.store.throughput import EncodeRate

    rates = {c: EncodeRate(100e6, 1.0) for c in ("zstd", "lz4", "snappy", "none")}
    rates[codec] = EncodeRate(900e6, 0.5)
    return lambda schema, threads, codecs: {"random-looking": rates, "banded": rates}


def test_compression_auto_is_recorded_and_a_resume_keeps_the_manifests_codec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pyarrow.parquet as pq

    from pipeline.store import throughput

    out = tmp_path / "out"
    base = ["run", "mlp", "-p", "n=6", "-p", "m=8", "-p", "hidden=4", "--shards", "2",
            "--out", out, "--executor", "local", "--no-progress"]
    monkeypatch.setattr(throughput, "encode_rates", _rates("lz4"))
    first = _run(*base, "--compression", "auto")
    assert first.exit_code == 0, first.output
    assert "note: --compression auto: lz4 (disk " in first.output
    doc = read_doc(out)
    assert doc["options"]["compression"] == "lz4"
    facts = doc["compression_auto"]
    assert facts["codec"] == "lz4" and facts["disk_bytes_per_s"] > 0
    assert facts["encode"]["banded"]["lz4"]["ratio"] == 0.5 and facts["threads"] >= 1
    for part in sorted(out.glob("part-*.parquet")):
        assert pq.ParquetFile(part).metadata.row_group(0).column(1).compression == "LZ4"
    expected = read_jacobian(out)
    # auto on resume is the manifest's codec, whatever the rates say now
    monkeypatch.setattr(throughput, "encode_rates", _rates("none"))
    (out / "part-00001.parquet").unlink()
    again = _run(*base, "--compression", "auto")
    assert again.exit_code == 0 and "resuming: 1 of 2" in again.output, again.output
    doc = read_doc(out)
    assert doc["options"]["compression"] == "lz4" and doc["compression_auto"]["resumed"]
    assert pq.ParquetFile(out / "part-00001.parquet").metadata.row_group(0).column(
        1).compression == "LZ4"
    np.testing.assert_array_equal(read_jacobian(out), expected)
    # the codec named explicitly resumes too; another one is refused
    assert _run(*base, "--compression", "lz4").exit_code == 0
    line = _one_error(_run(*base, "--compression", "none"))
    assert "written with --compression lz4" in line, line
    # a cleared folder measures again
    assert _run(*base, "--compression", "auto", "--overwrite", "--no-resume").exit_code == 0
    assert read_doc(out)["options"]["compression"] == "none"
    np.testing.assert_array_equal(read_jacobian(out), expected)


def test_compression_auto_resumes_a_folder_written_with_a_named_codec(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pipeline.store import throughput

    out = tmp_path / "out"
    base = ["run", "mlp", "-p", "n=6", "-p", "m=8", "-p", "hidden=4", "--shards", "2",
            "--out", out, "--executor", "local", "--no-progress"]
    assert _run(*base, "--compression", "snappy").exit_code == 0
    monkeypatch.setattr(throughput, "encode_rates", _rates("none"))
    monkeypatch.setattr(throughput, "disk_rate", lambda storage: pytest.fail("probed"))
    result = _run(*base, "--compression", "auto")
    assert result.exit_code == 0, result.output
    assert "resuming: 2 of 2" in result.output
    assert read_doc(out)["options"]["compression"] == "snappy"


def test_compression_auto_through_the_python_api(tmp_path: Path, monkeypatch) -> None:
    import pipeline
    from pipeline.store import throughput

    monkeypatch.setattr(throughput, "encode_rates", _rates("snappy"))
    summary = pipeline.run("mlp", params={"n": 6, "m": 8, "hidden": 4}, out=str(tmp_path / "o"),
                           compression="auto", executor="local", progress=False)
    assert summary.manifest.options["compression"] == "snappy"
    assert read_doc(tmp_path / "o")["compression_auto"]["codec"] == "snappy"
    with pytest.raises(JacpipeError, match="^compression must be one of auto, zstd, lz4, snappy"):
        pipeline.run("mlp", out=str(tmp_path / "p"), compression="brotli")
