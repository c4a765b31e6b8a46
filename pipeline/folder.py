"""The result folder's one owner: prepare it for a run, commit shards, finish, sweep leftovers.

What lives in ``OUT/`` and who may touch it:

- ``_manifest.json``: the commit record (:class:`pipeline.manifest.Manifest`);
  only the driver writes it, through :class:`ResultFolder`.
- ``part-NNNNN.parquet``: one per shard (:func:`pipeline.parts.part_name`),
  written by a worker under a temp name and renamed into place.
- leftovers, all starting with ``.`` so readers skip them: parts being
  written (``.part-*.tmp``), manifests being rewritten
  (``._manifest.json.*.tmp``), and attempt markers (``.attempt-*``) with their
  own temp files (``..attempt-*.tmp``). A crash at any moment leaves only
  these; they are swept on resume and at the end of a run.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from pipeline.errors import JacpipeError
from pipeline.manifest import COMMIT_LOG, COMMIT_OBJECT, MANIFEST, Manifest, append_commit
from pipeline.shard import ShardResult
from pipeline.storage import Storage

#: Prefixes of every file a run writes into its folder.
OUR_FILES = (
    "part-", ".part-", ".attempt-", "..attempt-", "._manifest.json", MANIFEST, COMMIT_LOG,
    COMMIT_OBJECT,
)


def is_leftover(name: str) -> bool:
    """Whether ``name`` is a temp file or attempt marker of a run, never part of a result."""
    return name.startswith((".part-", ".attempt-", "..attempt-", "._manifest.json."))


def default_out(job: str) -> str:
    """Where ``jacpipe run JOB`` writes without ``--out``."""
    return f"out/{job.replace(':', '_').replace('.', '_')}"


def record_attempt(storage: Storage, run_id: str, index: int) -> int:
    """Count this shard's attempts in this run by marker files; returns this attempt's number.

    A worker killed mid-shard is retried by Ray; the markers tell the retry
    which attempt it is (recorded in the manifest).
    """
    prefix = f".attempt-{run_id}-{index:05d}-"
    earlier = sum(1 for name in storage.listdir() if name.startswith(prefix))
    storage.write_atomic(f"{prefix}{uuid.uuid4().hex[:8]}", b"")
    return earlier + 1


class ResultFolder:
    """A result folder during a run (the driver's side).

    Args:
        storage: where the folder is.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.manifest: Manifest | None = None

    # -- before the run ---------------------------------------------------------
    def prepare(
        self, manifest: Manifest, *, resume: bool, overwrite: bool
    ) -> dict[int, ShardResult]:
        """Make the folder ready for the run described by ``manifest`` and write it.

        Returns:
            Committed shards of the same run that are kept (resume), by index;
            they are also recorded in ``manifest``.

        Raises:
            JacpipeError: the folder holds another job's result (without
                ``overwrite``) or unrelated files, or cannot be created.
        """
        if self.storage.is_dir():
            keep = self._reuse(manifest.identity(), resume=resume, overwrite=overwrite)
        else:
            self._create()
            keep = {}
        for result in keep.values():
            manifest.commit(result)
        self.manifest = manifest
        manifest.write(self.storage)
        return keep

    def _create(self) -> None:
        try:
            self.storage.makedirs()
        except OSError as exc:
            raise JacpipeError(
                f"--out {self.storage.display}: cannot create the folder ({exc.strerror or exc})"
            ) from None

    def _reuse(
        self, identity: dict[str, Any], *, resume: bool, overwrite: bool
    ) -> dict[int, ShardResult]:
        names = self.storage.listdir()
        try:
            old = Manifest.read(self.storage) if names else None
        except JacpipeError:
            # A garbage manifest is no commit record: nothing in the folder can
            # be trusted. Only --overwrite may start again there.
            if not overwrite:
                raise
            return self._clear()
        if old is None:
            foreign = [n for n in names if not n.startswith(OUR_FILES)]
            if foreign:
                raise JacpipeError(
                    f"--out {self.storage.display} is not empty and holds no jacpipe result "
                    f"({', '.join(foreign[:3])}{'...' if len(foreign) > 3 else ''}); "
                    "give an empty or new folder"
                )
            return self._clear()
        differs = _differences(old.identity(), identity)
        if differs and not overwrite:
            what = f"job {old.job!r} with params {json.dumps(old.params)}"
            raise JacpipeError(
                f"--out {self.storage.display} holds a result of {what} (differs in: "
                f"{', '.join(differs)}); pass --overwrite to replace it or choose another --out"
            )
        if differs or not resume:
            return self._clear()
        return self._trusted_shards()

    def _trusted_shards(self) -> dict[int, ShardResult]:
        """Committed shards whose parts verify; leftovers of a crashed run are swept."""
        from pipeline.reader import JacobianResult

        result = JacobianResult(self.storage.uri)
        bad = {p.index for p in result.check(checksums=True)}
        keep = {s.index: s for s in result.manifest.committed if s.index not in bad}
        # Uncommitted or corrupt parts are recomputed (their new file replaces
        # them by rename).
        self.sweep()
        return keep

    def _clear(self) -> dict[int, ShardResult]:
        for name in self.storage.listdir():
            if name.startswith(OUR_FILES):
                self.storage.delete(name)
        return {}

    # -- during and after the run -------------------------------------------------
    def commit(self, result: ShardResult) -> None:
        """Commit a finished shard: one durable line in the commit log (NOTE: [Commit log])."""
        assert self.manifest is not None, "prepare() first"
        append_commit(self.storage, result)
        self.manifest.commit(result)

    def finish(self, status: str, **facts: Any) -> None:
        """Write the final status (and facts such as timings); sweep leftovers when complete."""
        assert self.manifest is not None, "prepare() first"
        self.manifest.status = status
        for key, value in facts.items():
            setattr(self.manifest, key, value)
        self.manifest.write(self.storage)
        if status == "complete":
            self.sweep()

    def sweep(self) -> None:
        """Delete leftovers (temp files and attempt markers) of this or earlier runs."""
        for name in self.storage.listdir():
            if is_leftover(name):
                self.storage.delete(name)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys in which two runs' identities differ.

    The fingerprint is compared with :func:`pipeline.problem.check_fingerprint`'s
    tolerance, so a resume on a machine whose BLAS rounds the last bits
    differently is still the same run.
    """
    from pipeline.problem import check_fingerprint

    differs = []
    for key in sorted(set(old) | set(new)):
        if key == "fingerprint" and isinstance(old.get(key), dict):
            try:
                check_fingerprint(old[key], new[key])
            except (JacpipeError, KeyError, TypeError, ValueError):
                differs.append(key)
        elif old.get(key) != new.get(key):
            differs.append(key)
    return differs
