"""Test helpers: a result's manifest document, read and rewritten as a tampering user would."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store.manifest import MANIFEST, MANIFEST_KEY, unwrap_manifest


def read_doc(out: str | Path) -> dict[str, Any]:
    """The manifest document of the result in ``out``."""
    return json.loads(unwrap_manifest((Path(out) / MANIFEST).read_bytes()))


def write_doc(out: str | Path, doc: Any) -> None:
    """Replace the manifest document of ``out`` (its container schema is kept)."""
    path = Path(out) / MANIFEST
    path.write_bytes(with_doc(path.read_bytes(), doc))


def with_doc(raw: bytes, doc: Any) -> bytes:
    """The bytes of a manifest file ``raw`` with its document replaced by ``doc``."""
    schema = pq.read_schema(pa.BufferReader(raw))
    sink = pa.BufferOutputStream()
    pq.write_metadata(schema.with_metadata({MANIFEST_KEY: json.dumps(doc).encode()}), sink)
    return sink.getvalue().to_pybytes()
