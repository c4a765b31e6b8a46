"""Storage of results: folders, Parquet parts, the manifest, readers; imports only the core."""

from pipeline.core.faces import lazy_face

_OWNERS = {
    "open_jacobian": "pipeline.store.reader",
    "read_jacobian": "pipeline.store.reader",
    "JacobianResult": "pipeline.store.reader",
    "export": "pipeline.store.export",
    "ResultFolder": "pipeline.store.folder",
    "default_out": "pipeline.store.folder",
    "Manifest": "pipeline.store.manifest",
    "Storage": "pipeline.store.storage",
    "PartWriter": "pipeline.store.parts",
    "dense_schema": "pipeline.store.parts",
    "sparse_schema": "pipeline.store.parts",
    "part_name": "pipeline.store.parts",
}
__all__ = sorted(_OWNERS)
__getattr__, __dir__ = lazy_face(__name__, _OWNERS)
