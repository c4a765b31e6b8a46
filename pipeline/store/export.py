"""``jacpipe export``: a result folder streamed into one NumPy ``.npy`` or SciPy ``.npz`` file.

A dense result is copied row block by row block (one Parquet row group at a
time) into a memory-mapped ``.npy`` (:func:`numpy.lib.format.open_memmap`),
so a result of any size exports with a few blocks in memory. ``.npz`` holds a
``scipy.sparse`` CSR matrix (:func:`scipy.sparse.save_npz`); it needs memory
for the non-zeros. The file is written under a temporary name and renamed,
so a crash never leaves a half file under the name asked for.

``.safetensors`` and Zarr are not written: neither package is a dependency of
jacpipe (a clear error says so and names the formats that are).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import JacpipeError
from pipeline.core.kinds import kind_of, layout_of
from pipeline.core.signals import SIGTERM_EXIT, SigtermSeen, Terminated, sigterm_as_interrupt

#: Formats written, by file extension.
FORMATS = (".npy", ".npz")
#: Formats recognised but left to packages jacpipe does not depend on.
_NOT_BUNDLED = {".safetensors": "safetensors", ".zarr": "zarr"}


@dataclass(frozen=True)
class Exported:
    """What :func:`export` wrote."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    nnz: int | None  # stored entries (.npz only)
    notes: tuple[str, ...] = ()  # what the user should know (a sparse result written dense)


def export(out: str, path: str | os.PathLike[str], *, overwrite: bool = False) -> Exported:
    """Write the result in ``out`` to ``path``; the format follows the extension.

    ``.npy``: the dense array as :func:`pipeline.read_jacobian` returns it,
    ``(m, n)`` or ``(B, m, n)`` for a batched result, streamed. ``.npz``: a
    CSR matrix of the ``(rows, n)`` flat-row matrix (batched: ``B*m`` rows).

    Args:
        out: the result folder (or ``s3://`` URI) of a finished ``jacpipe run``.
        path: the file to write, ending in ``.npy`` or ``.npz``.
        overwrite: replace ``path`` if it exists (otherwise it is refused).

    Returns:
        An :class:`Exported` (path, shape, dtype, non-zeros).

    Raises:
        JacpipeError: an unknown extension, a format whose package is not
            installed, an incomplete or corrupt result, or an unwritable path.
    """
    from pipeline.store.reader import open_jacobian

    target = Path(path)
    suffix = target.suffix.lower()
    if suffix in _NOT_BUNDLED:
        raise JacpipeError(
            f"export {target}: {suffix} needs the {_NOT_BUNDLED[suffix]!r} package, which "
            "jacpipe does not depend on; export to .npy (dense) or .npz (sparse CSR)"
        )
    if suffix not in FORMATS:
        raise JacpipeError(
            f"export {target}: expected a file name ending in .npy (dense array) or .npz "
            f"(scipy.sparse CSR), got {suffix or 'no extension'!r}"
        )
    if not overwrite and (target.exists() or target.is_symlink()):
        raise JacpipeError(f"export {target}: the file exists; pass --overwrite to replace it")
    result = open_jacobian(out)
    problems = result.check(checksums=True)
    if problems:
        raise JacpipeError(
            f"cannot export an incomplete result: {len(problems)} of {len(result.plan)} "
            f"shards are not readable ({problems[0]}); rerun the same `jacpipe run` to finish it"
        )
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")
    seen = SigtermSeen()
    try:
        with sigterm_as_interrupt(seen):
            target.parent.mkdir(parents=True, exist_ok=True)
            done = _write_npy(result, tmp) if suffix == ".npy" else _write_npz(result, tmp)
            os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise JacpipeError(f"export {target}: cannot write it ({exc.strerror or exc})") from None
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        tmp.unlink(missing_ok=True)
        terminated = isinstance(exc, Terminated) or seen.received
        raise JacpipeError(
            f"export {target}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; "
            "the partial file was removed and nothing was written: run `jacpipe export` again",
            exit_code=SIGTERM_EXIT if terminated else 130,
        ) from None
    notes = () if suffix != ".npy" or done[2] is None else (_dense_note(done, target),)
    return Exported(str(target), done[0], done[1], None if suffix == ".npy" else done[2], notes)


def _dense_note(done: tuple[tuple[int, ...], str, int | None], target: Path) -> str:
    """The note for a sparse result written as a dense ``.npy``: its size, and ``.npz``."""
    import numpy as np

    shape, dtype, nnz = done
    entries = int(np.prod(shape))
    size = entries * np.dtype(dtype).itemsize
    return (f"the result is sparse ({nnz} stored entries of {entries}); {target.name} holds it "
            f"dense ({size / 1e6:.1f} MB); export to .npz to keep it sparse")


def _write_npy(result: Any, path: Path) -> tuple[tuple[int, ...], str, int | None]:
    """Stream the rows into a memory-mapped ``.npy``; the stored entries of a sparse result."""
    import numpy as np

    from pipeline.store.parts import NUMPY_FLOAT

    s = result.shapes
    shape = (s.batch, s.m, s.n) if kind_of(s.kind).per_sample else tuple(result.shape)
    dtype = np.dtype(NUMPY_FLOAT[result.dtype])
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    flat = mm.reshape(result.shape)  # a view: rows land in the file
    stored: int | None = None
    if layout_of(result.layout).fixed_width:
        for rows, block in result.iter_blocks(verify=False):
            flat[rows] = block
    else:
        stored = 0
        for _, start, stop in result.plan:
            rows = result.read_sparse(np.arange(start, stop), verify=False)
            stored += int(rows.nnz)
            flat[start:stop] = rows.toarray()
    mm.flush()
    del flat, mm
    return shape, str(dtype), stored


def _write_npz(result: Any, path: Path) -> tuple[tuple[int, ...], str, int]:
    """Collect the non-zeros as CSR (block by block for a dense result) and save them."""
    import numpy as np
    import scipy.sparse as sp

    if not layout_of(result.layout).fixed_width:
        mat = result.read_sparse(verify=False)
    else:
        parts, rows_seen = [], []
        for rows, block in result.iter_blocks(verify=False):
            parts.append(sp.csr_matrix(block))
            rows_seen.append(rows)
        order = np.concatenate(rows_seen) if rows_seen else np.zeros(0, np.int64)
        mat = sp.vstack(parts, format="csr") if parts else sp.csr_matrix(result.shape)
        if not np.array_equal(order, np.arange(result.shape[0])):
            mat = mat[np.argsort(order)]
    sp.save_npz(path, mat.tocsr(), compressed=True)
    return tuple(mat.shape), str(mat.dtype), int(mat.nnz)
