"""``pipeline.store.reader``: rows, samples, and parts checked on read."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.core.errors import JacpipeError
from pipeline.store.manifest import Manifest
from pipeline.store.reader import open_jacobian, read_jacobian
from pipeline.store.storage import Storage
from tests.store.results import ROWS, N, _batched, _edit_manifest, _swap_part, write_result

cli = CliRunner()


def _invoke(*args: object):
    return cli.invoke(app, [str(a) for a in args])


def test_rows_accepts_integers_slices_and_masks_as_numpy_does(tmp_path: Path) -> None:
    J = write_result(str(tmp_path))
    mask = np.zeros(ROWS, bool)
    mask[[1, 7, 11]] = True
    for rows in (3, [5, 0, 5], np.array([11, 2], np.uint8), slice(2, 9, 3), slice(None, None, -1),
                 mask, list(mask), [], np.array([], np.int64)):
        got = read_jacobian(tmp_path, rows=rows)
        want = J[np.arange(ROWS)[rows]] if not isinstance(rows, int) else J[[rows]]
        if isinstance(rows, list) and not rows:
            want = J[:0]
        np.testing.assert_array_equal(got, want.reshape(-1, N), err_msg=repr(rows))
    assert [b.tolist() for b, _ in open_jacobian(tmp_path).iter_blocks(mask)] == [[1], [7], [11]]


@pytest.mark.parametrize("rows,match", [
    ([1.7], "expected an integer, integers, a slice or a boolean mask"),
    (np.array([1.0, 2.0]), "expected an integer"),
    ("3", "expected an integer"),
    (["a"], "expected an integer"),
    (np.ones(ROWS - 1, bool), f"one entry per row \\({ROWS}\\)"),
    (np.ones((2, ROWS), bool), "one entry per row"),
    ([ROWS], f"row {ROWS} out of range: the result has {ROWS} rows"),
    ([-1], "row -1 out of range"),
    (slice(0.5, 3), "integer bounds"),
    (slice(0, 10, 0), "slice step cannot be zero"),
    ([[1, 2], [3]], "expected an integer"),
])
def test_rows_of_any_other_kind_are_one_clear_error(tmp_path: Path, rows, match) -> None:
    write_result(str(tmp_path))
    with pytest.raises(JacpipeError, match=match):
        read_jacobian(tmp_path, rows=rows)


def test_sample_refuses_non_integers(tmp_path: Path) -> None:
    result = open_jacobian(_batched(tmp_path))
    np.testing.assert_array_equal(result.read(sample=1), result.read()[1])
    for bad in ([1.7], "1", [True]):
        with pytest.raises(JacpipeError, match="expected an integer or integers"):
            result.read(sample=bad)


def test_an_edited_dtype_is_caught_on_read_not_downcast(tmp_path: Path) -> None:
    write_result(str(tmp_path))
    _edit_manifest(tmp_path, lambda d: d["shapes"].__setitem__("dtype", "float32"))
    for verify in (True, False):
        with pytest.raises(JacpipeError, match=(
            r"part-00000.parquet\): holds double rows of width 5, the manifest says "
            r"float32 x 5; rerun `jacpipe run` with --overwrite"
        )):
            read_jacobian(tmp_path, verify=verify)
    problems = open_jacobian(tmp_path).check(checksums=True)
    assert [p.index for p in problems] == [0, 1, 2]
    result = _invoke("inspect", tmp_path)
    assert result.exit_code == 1 and "holds double rows of width 5" in result.output
    result = _invoke("export", tmp_path, tmp_path / "J.npy")
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "holds double rows of width 5, the manifest says float32 x 5" in errors[0]
    assert not (tmp_path / "J.npy").exists()


def test_a_part_holding_other_rows_is_caught(tmp_path: Path) -> None:
    write_result(str(tmp_path))
    other = tmp_path / "other"
    write_result(str(other), shards=3)
    # part 2 of the same width but holding rows 0..4 (another plan's first shard)
    _swap_part(tmp_path, 2, other / "part-00000.parquet")
    problems = open_jacobian(tmp_path).check(checksums=False)
    assert [(p.index, p.reason) for p in problems] == [
        (2, "holds rows 0..4, the manifest says rows 8..12")]


def test_nothing_is_allocated_before_the_needed_parts_are_checked(tmp_path: Path) -> None:
    write_result(str(tmp_path))
    (tmp_path / "part-00002.parquet").unlink()
    _edit_manifest(tmp_path, lambda d: None)
    result = open_jacobian(tmp_path)
    calls = []
    real_empty = np.empty

    def spy(*args, **kwargs):
        calls.append(args)
        return real_empty(*args, **kwargs)

    np.empty = spy
    try:
        with pytest.raises(JacpipeError, match=r"shard 2 \(part-00002.parquet\): missing"):
            result.read()
    finally:
        np.empty = real_empty
    assert calls == []


def test_old_format_1_parts_still_read(tmp_path):
    """A part written the old way (pyarrow's own writer, nullable elements) still reads."""
    rng = np.random.default_rng(1)
    data = rng.standard_normal((30, 7)).astype(np.float32)
    from pipeline.core.shapes import Shapes

    shapes = Shapes("jacobian", (7,), (30,), None, "float32")
    schema = pa.schema([pa.field("row", pa.int64(), nullable=False),
                        pa.field("values", pa.list_(pa.float32(), 7), nullable=False)])
    entries = []
    for i, (a, b) in enumerate([(0, 13), (13, 30)]):
        values = pa.FixedSizeListArray.from_arrays(pa.array(data[a:b].ravel()), 7)
        meta = {b"jacpipe": json.dumps({"format_version": 1})}
        table = pa.table({"row": np.arange(a, b), "values": values},
                         schema=schema.with_metadata(meta))
        path = tmp_path / f"part-{i:05d}.parquet"
        pq.write_table(table, path, row_group_size=5, compression="zstd", use_dictionary=False,
                       write_statistics=["row"],
                       column_encoding={"row": "PLAIN", "values.list.element": "BYTE_STREAM_SPLIT"})
        import hashlib

        entries.append({"index": i, "start": a, "stop": b, "file": path.name, "rows": b - a,
                        "checksum": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "bytes": path.stat().st_size, "seconds": 0.1})
    Manifest.from_json({"format_version": 1, "kind": "jacobian", "shapes": shapes.to_json(),
                        "dtype": "float32", "plan": [[0, 13], [13, 30]], "shards": entries,
                        "status": "complete"}).write(Storage(str(tmp_path)))
    assert np.array_equal(read_jacobian(tmp_path), data)
    assert np.array_equal(read_jacobian(tmp_path, rows=[29, 3, 14]), data[[29, 3, 14]])
    res = open_jacobian(tmp_path)
    assert res.committed[0].compute_seconds == 0.0  # old manifests: defaults
    assert np.array_equal(np.concatenate([b for _, b in res.iter_blocks()]), data)
    v = rng.standard_normal(7)
    np.testing.assert_allclose(res.as_linear_operator().matvec(v), data @ v, rtol=1e-5)


def test_checksums_catch_accidents_but_not_a_writer_who_updates_them(tmp_path: Path) -> None:
    """What the README's "What the checksums protect against" paragraph promises, and no more."""
    good = write_result(str(tmp_path / "good"))
    other = tmp_path / "other"
    write_result(str(other), values=good * 2.0)
    # An accident: part 1 replaced (same size, other values), its manifest entry untouched.
    accident = tmp_path / "accident"
    write_result(str(accident))
    (accident / "part-00001.parquet").write_bytes((other / "part-00001.parquet").read_bytes())
    with pytest.raises(JacpipeError, match="checksum mismatch"):
        read_jacobian(accident)
    # A writer who also updates the checksum and size: accepted (only `compare` sees it).
    forged = tmp_path / "forged"
    write_result(str(forged))
    _swap_part(forged, 1, other / "part-00001.parquet")
    got = read_jacobian(forged)
    np.testing.assert_array_equal(got[4:8], good[4:8] * 2.0)
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert "**What the checksums protect against.**" in readme
