"""The result folder's one owner: prepare it for a run, commit shards, finish, sweep leftovers.

What lives in ``OUT/`` and who may touch it:

- ``_manifest.parquet``: the commit record (:class:`pipeline.store.manifest.Manifest`,
  NOTE: [Manifest container]); only the driver writes it, through
  :class:`ResultFolder`. ``_commits.jsonl`` holds commits since it was last
  rewritten, and ``.lock`` the run holding the folder; both are gone when a
  run ends, so a finished folder holds Parquet files only and every reader
  (Polars included) takes the folder itself.
- ``part-NNNNN.parquet``: one per shard (:func:`pipeline.store.parts.part_name`),
  written by a worker under a temp name and renamed into place.
- leftovers, all starting with ``.`` so readers skip them: parts being
  written (``.part-*.tmp``), manifests being rewritten
  (``._manifest.parquet.*.tmp``), and attempt markers (``.attempt-*``) with their
  own temp files (``..attempt-*.tmp``), and the disk probe of
  ``--compression auto`` (``.probe-*.tmp``). A crash at any moment leaves only
  these; they are swept on resume and at the end of a run.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import time
import uuid
from typing import Any

from pipeline.core.codec import AUTO
from pipeline.core.errors import JacpipeError, first_line
from pipeline.core.shard import ShardResult
from pipeline.store.manifest import (
    COMMIT_LOG,
    COMMIT_OBJECT,
    LEGACY_MANIFEST,
    MANIFEST,
    Manifest,
    append_commit,
)
from pipeline.store.storage import Storage, shown_name
from pipeline.store.throughput import PROBE_PREFIX, auto_codec

#: Prefixes of every file a run writes into its folder.
OUR_FILES = (
    "part-", ".part-", ".attempt-", "..attempt-", "._manifest.", MANIFEST, LEGACY_MANIFEST,
    COMMIT_LOG, COMMIT_OBJECT, ".lock", "_stray", PROBE_PREFIX,
)
LOCK = ".lock"
#: Where resume moves part-like files that the manifest does not own, renamed
#: ``NAME.stray`` so that no reader of the folder counts their rows (Polars,
#: which reads ``_`` folders too, refuses the folder instead).
STRAY = "_stray"
_PART = re.compile(r"^part-(\d+)\.parquet$")
#: An object-store lease not refreshed for this long belongs to a dead run.
LEASE_SECONDS = 600.0


def is_leftover(name: str) -> bool:
    """Whether ``name`` is a temp file or attempt marker of a run, never part of a result."""
    return name.startswith((".part-", ".attempt-", "..attempt-", "._manifest.", PROBE_PREFIX))


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


def unusable_folder(display: str, exc: OSError, doing: str) -> str:
    """One line for an ``--out`` folder the operating system refuses (``exc``).

    Names the folder, what jacpipe tried (``doing``), the system's reason, and
    the fix: a shorter name, permission to write, or another ``--out``.
    """
    code = exc.errno
    if code is None:  # pyarrow puts the errno in its message: "... [errno 36] ..."
        found = re.search(r"\[errno (\d+)\]", str(exc))
        code = int(found.group(1)) if found else None
    reason = os.strerror(code) if code else first_line(exc, limit=200)
    shown = display if len(display) <= 80 else f"{display[:60]}...({len(display)} characters)"
    if code == errno.ENAMETOOLONG:
        return (f"--out {shown}: the name is too long for the file system ({reason}); "
                "choose a shorter --out")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"--out {shown}: no permission to write in the folder (cannot {doing}: "
                f"{reason}); make it writable (e.g. chmod u+w) or choose another --out")
    return f"--out {shown}: cannot {doing} ({reason}); choose another --out"


class ResultFolder:
    """A result folder during a run (the driver's side).

    Args:
        storage: where the folder is.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.manifest: Manifest | None = None
        self.notes: list[str] = []
        self._resumed: Manifest | None = None  # the folder's manifest when this run resumes it
        self._lock: Any = None
        self._lease_written = 0.0

    # -- one run per folder -------------------------------------------------------
    def lock(self, run_id: str) -> None:
        """Hold the folder for this run: no second run may prepare or commit in it.

        NOTE: [One run per folder]
            Two runs sharing a folder would sweep each other's temporary files
            and interleave commits. Locally the lock is ``flock`` on ``.lock``:
            the kernel drops it when the process dies, so a stale lock of a
            killed run never blocks (nothing to take over by hand). Object
            stores have no locks: a lease object ``.lock`` holds the run id,
            refreshed as shards commit; one older than LEASE_SECONDS belongs
            to a dead run and is taken over.

        Raises:
            JacpipeError: another live run holds the folder (it is named).
        """
        holder = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(),
                  "since": utcnow_compact()}
        try:
            if self.storage.local:
                self._flock(holder)
            else:
                self._lease(holder)
        except OSError as exc:
            problem = unusable_folder(self.storage.display, exc, f"write {LOCK}")
            raise JacpipeError(problem) from None

    def _flock(self, holder: dict[str, Any]) -> None:
        import fcntl

        path = self.storage.path(LOCK)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise JacpipeError(
                    f"--out {self.storage.display} is in use by another run ({_holder(other)}); "
                    "wait for it to end or stop it, or choose another --out"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed it as we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        self._lock = fd

    def _lease(self, holder: dict[str, Any]) -> None:
        if self.storage.exists(LOCK):
            try:
                other = json.loads(self.storage.read_bytes(LOCK))
                age = time.time() - float(other.get("renewed", 0))
            except (ValueError, TypeError, AttributeError):
                other, age = {}, LEASE_SECONDS + 1
            if age < LEASE_SECONDS and other.get("run_id") != holder["run_id"]:
                raise JacpipeError(
                    f"--out {self.storage.display} is in use by another run "
                    f"({_holder(json.dumps(other))}, renewed {age:.0f}s ago; a lease older "
                    f"than {LEASE_SECONDS:.0f}s is taken over); wait for it or choose another --out"
                )
        self._lock = holder
        self._renew(force=True)

    def _renew(self, *, force: bool = False) -> None:
        if isinstance(self._lock, dict) and (force or time.time() - self._lease_written > 30):
            self._lease_written = time.time()
            self.storage.write_atomic(
                LOCK, json.dumps(dict(self._lock, renewed=self._lease_written)).encode()
            )

    def unlock(self) -> None:
        """Release the folder (also done by the OS when the process dies, locally)."""
        if isinstance(self._lock, int):
            # Unlink while holding it (a waiter re-checks the inode), then release.
            self.storage.delete(LOCK)
            os.close(self._lock)
        elif isinstance(self._lock, dict):
            self.storage.delete(LOCK)
        self._lock = None

    # -- before the run ---------------------------------------------------------
    def prepare(
        self, manifest: Manifest, *, resume: bool, overwrite: bool
    ) -> dict[int, ShardResult]:
        """Make the folder ready for the run described by ``manifest`` and write it.

        ``--compression auto`` in ``manifest.options`` is resolved here, before
        any part is written (NOTE: [Auto codec on resume]).

        Returns:
            Committed shards of the same run that are kept (resume), by index;
            they are also recorded in ``manifest``.

        Raises:
            JacpipeError: the folder holds another job's result (without
                ``overwrite``) or unrelated files, or cannot be created.
        """
        try:
            missing = not self.storage.is_dir()
        except OSError as exc:
            raise JacpipeError(unusable_folder(self.storage.display, exc, "look it up")) from None
        if missing:
            self._create()
        self.lock(manifest.run_id)
        try:
            keep = self._reuse(manifest.identity(), resume=resume, overwrite=overwrite,
                               compression=manifest.options.get("compression"))
            if manifest.options.get("compression") == AUTO:
                self._resolve_auto(manifest)
        except BaseException:
            self.unlock()
            raise
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
        self, identity: dict[str, Any], *, resume: bool, overwrite: bool,
        compression: str | None = None,
    ) -> dict[int, ShardResult]:
        names = [n for n in self.storage.listdir() if n != LOCK]
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
                    f"({', '.join(map(shown_name, foreign[:3]))}"
                    f"{'...' if len(foreign) > 3 else ''}); "
                    "give an empty or new folder"
                )
            return self._clear()
        differs = _differences(old.identity(), identity)
        if differs and not overwrite:
            if all(d.startswith("fingerprint") for d in differs):
                raise JacpipeError(
                    f"--out {self.storage.display}: the job changed since these shards were "
                    f"written (differs in: {', '.join(differs)}); --overwrite to start again"
                )
            what = f"job {old.job!r} with params {json.dumps(old.params)}"
            raise JacpipeError(
                f"--out {self.storage.display} holds a result of {what} (differs in: "
                f"{', '.join(differs)}); pass --overwrite to replace it or choose another --out"
            )
        if differs or not resume:
            return self._clear()
        if self._codec_differs(old, compression, overwrite=overwrite):
            return self._clear()
        self._resumed = old
        return self._trusted_shards()

    def _resolve_auto(self, manifest: Manifest) -> None:
        """Replace ``--compression auto`` in ``manifest`` by a codec, and record why.

        NOTE: [Auto codec on resume]
            The manifest names the codec of every part, so a resumed run keeps
            the codec its folder's manifest names (``auto`` on resume is that
            codec, and so are its measurements); a new or cleared folder
            measures the rates (:func:`pipeline.store.throughput.auto_codec`)
            and takes the codec that commits fastest.
        """
        old = self._resumed
        before = None if old is None else old.options.get("compression")
        if before is not None and before != AUTO:
            manifest.options["compression"] = before
            facts = dict(old.extra.get("compression_auto") or {"codec": before})  # type: ignore[union-attr]
            manifest.extra["compression_auto"] = dict(facts, resumed=True)
            return
        choice = auto_codec(self.storage, manifest.part_schema())
        manifest.options["compression"] = choice.codec
        manifest.extra["compression_auto"] = choice.to_json()
        self.notes.append(choice.line())

    def _codec_differs(self, old: Manifest, compression: str | None, *, overwrite: bool) -> bool:
        """Whether the parts have another codec (then only ``--overwrite`` may go on).

        The manifest must name the codec of every part, so a resume with another
        ``--compression`` is refused rather than recorded under the new name.

        Raises:
            JacpipeError: the folder's parts were written with another ``--compression``
                and ``overwrite`` is False.
        """
        before = old.options.get("compression")
        if before is None or compression in (None, AUTO) or before == compression:
            return False
        if overwrite:
            return True
        raise JacpipeError(
            f"--out {self.storage.display} was written with --compression {before}; rerun with "
            f"--compression {before} to resume, or --overwrite to rewrite it with {compression}"
        )

    def _trusted_shards(self) -> dict[int, ShardResult]:
        """Committed shards whose parts verify; leftovers of a crashed run are swept."""
        from pipeline.store.reader import JacobianResult

        result = JacobianResult(self.storage.uri)
        bad = {p.index for p in result.check(checksums=True)}
        keep = {s.index: s for s in result.manifest.committed if s.index not in bad}
        # Uncommitted or corrupt parts are recomputed (their new file replaces
        # them by rename); part-like files outside the plan are moved aside.
        self.sweep()
        self._move_strays(len(result.manifest.plan))
        return keep

    def _move_strays(self, planned: int) -> None:
        strays = stray_parts(self.storage.listdir(), planned)
        for name in strays:
            self.storage.move(name, f"{STRAY}/{name}.stray")
        if strays:
            self.notes.append(
                f"moved {len(strays)} file(s) that look like parts but are not in the plan "
                f"({', '.join(map(shown_name, strays[:3]))}{'...' if len(strays) > 3 else ''}) to "
                f"{self.storage.display.rstrip('/')}/{STRAY}/ (readers of the folder would "
                "count their rows)"
            )

    def _clear(self) -> dict[int, ShardResult]:
        for name in self.storage.listdir():
            if name.startswith(OUR_FILES) and name not in (LOCK, STRAY):
                self.storage.delete(name)
        return {}

    # -- during and after the run -------------------------------------------------
    def commit(self, result: ShardResult) -> None:
        """Commit a finished shard: one durable line in the commit log (NOTE: [Commit log])."""
        assert self.manifest is not None, "prepare() first"
        # Memory first: a SIGTERM or Ctrl-C raised between the two steps must not
        # leave a line in the log that the final manifest (which replaces the log)
        # lacks. Seen: "1 of 12 shards committed" after two lines were read.
        self.manifest.commit(result)
        append_commit(self.storage, result)
        self._renew()

    def finish(self, status: str, **facts: Any) -> None:
        """Write the final status (and facts such as timings); sweep leftovers when complete."""
        assert self.manifest is not None, "prepare() first"
        self.manifest.status = status
        for key, value in facts.items():
            setattr(self.manifest, key, value)
        try:
            self.manifest.write(self.storage)
            if status == "complete":
                self.sweep()
        finally:
            self.unlock()

    def sweep(self) -> None:
        """Delete leftovers (temp files and attempt markers) of this or earlier runs."""
        for name in self.storage.listdir():
            if is_leftover(name):
                self.storage.delete(name)


def stray_parts(names: list[str], planned: int) -> list[str]:
    """Names that look like part files but lie outside a plan of ``planned`` shards."""
    out = []
    for name in names:
        match = _PART.match(name)
        if name.startswith("part-") and (match is None or int(match.group(1)) >= planned):
            out.append(name)
    return out


def utcnow_compact() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _holder(text: str) -> str:
    """A lock holder's JSON as words (``run abc, pid 12 on host, since ...``)."""
    try:
        h = json.loads(text)
        return (f"run {h.get('run_id')}, pid {h.get('pid')} on {h.get('host')}, "
                f"since {h.get('since')}")
    except (ValueError, AttributeError):
        return "holder unknown"


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys in which two runs' identities differ.

    The fingerprint is compared with :func:`pipeline.core.fingerprint.check_fingerprint`'s
    tolerance, so a resume on a machine whose BLAS rounds the last bits
    differently is still the same run.
    """
    from pipeline.core.fingerprint import FingerprintMismatch, check_fingerprint

    differs = []
    for key in sorted(set(old) | set(new)):
        if key == "fingerprint" and isinstance(old.get(key), dict):
            try:
                check_fingerprint(old[key], new[key])
            except FingerprintMismatch as exc:
                differs.append(f"fingerprint: {exc.field}")
            except (JacpipeError, KeyError, TypeError, ValueError):
                differs.append(key)
        elif old.get(key) != new.get(key):
            differs.append(key)
    return differs
