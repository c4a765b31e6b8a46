"""Test helpers: complete results written without Ray (the manifest, parts and commits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.core.shapes import Shapes
from pipeline.core.shard import ShardResult
from pipeline.store.folder import ResultFolder
from pipeline.store.manifest import Manifest
from pipeline.store.parts import PartWriter, dense_schema, part_name
from pipeline.store.storage import Storage
from tests.manifests import read_doc, write_doc

ROWS, N = 12, 5


def write_result(
    out: str, *, rows: int = ROWS, n: int = N, shards: int = 3, dtype: str = "float64",
    values: np.ndarray | None = None,
) -> np.ndarray:
    """A complete dense result of ``fn(x) = J @ x`` in ``out``, as a run writes it; returns J."""
    storage = Storage(out)
    J = np.arange(rows * n, dtype=dtype).reshape(rows, n) if values is None else values
    bounds = np.linspace(0, rows, shards + 1).astype(int)
    plan = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    manifest = Manifest(
        job="tests.userjobs:matrix_io", params={}, fingerprint={}, method="rev",
        layout="dense", plan=plan, shapes=Shapes("jacobian", (n,), (rows,), None, dtype),
        run_id="r1",
    )
    folder = ResultFolder(storage)
    folder.prepare(manifest, resume=False, overwrite=True)
    for index, (a, b) in enumerate(plan):
        writer = PartWriter(storage, part_name(index), dense_schema(n, dtype), {}, group_rows=2)
        writer.write(a, J[a:b])
        info = writer.commit()
        folder.commit(ShardResult(index, a, b, info.file, info.rows, info.checksum, info.bytes))
    folder.finish("complete")
    return J


def _batched(out: Path) -> Path:
    """A batched result (2 samples of 3 x 4) written like :func:`write_result`."""
    write_result(str(out), rows=6, n=4, shards=2)
    _edit_manifest(out, lambda d: d["shapes"].update(
        kind="batched", batch=2, out_shape=[3], m=3, total_rows=6))
    return out


def _edit_manifest(out: Path, edit) -> None:
    doc = read_doc(out)
    edit(doc)
    write_doc(out, doc)


def _swap_part(out: Path, index: int, source: Path) -> None:
    """Replace part ``index`` by ``source`` and forge its manifest entry to match it."""
    name = part_name(index)
    (out / name).write_bytes(source.read_bytes())
    sha, size = Storage(str(out)).sha256(name), (out / name).stat().st_size

    def forge(doc):
        doc["shards"][index]["checksum"], doc["shards"][index]["bytes"] = sha, size

    _edit_manifest(out, forge)
