"""Where a result lives: a local folder or any ``pyarrow.fs`` filesystem (``s3://...``).

Byte-level operations only (list, read, atomic write, temp names, hashing);
what the files mean is :mod:`pipeline.store.folder`'s business. Every message that
shows a location goes through :meth:`Storage.redact`.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import threading
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.core.errors import JacpipeError, first_line


class Storage:
    """A result folder on a local disk or on any ``pyarrow.fs`` filesystem.

    Local folders: temp name, ``fsync``, atomic ``os.replace``. Object stores
    (``s3://...``): every write goes straight to its final key. An upload
    becomes visible only when its stream is closed, as a whole, so a reader
    never sees half an object; a temp key plus ``move`` would add a server-side
    copy (CopyObject, limited to 5 GiB) and a delete for nothing.

    ``uri`` is what the user gave (it may hold credentials and is what workers
    need); ``display`` is the same with any secret masked, for messages.
    """

    #: ``scheme://KEY:SECRET@`` and ``secret_key=`` / ``session_token=`` query values.
    _SECRET_RE = re.compile(
        r"(?P<a>[a-z][a-z0-9+.-]*://[^:/@?#\s]*:)[^@/?#\s]+(?=@)"
        r"|(?P<b>[?&](?:secret_key|session_token|secret|password)=)[^&#\s]+",
        re.IGNORECASE,
    )

    def __init__(self, out: str) -> None:
        self.uri = str(out)
        self.display = self.redact(self.uri)
        if "://" in self.uri and not self.uri.startswith("file://"):
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
                self.fs = _bounded(self.fs, answer_seconds())
            except (pa.ArrowInvalid, OSError, ValueError) as exc:
                raise JacpipeError(
                    f"output {self.display!r}: cannot open it ({self.redact(str(exc))}); "
                    "expected a local folder or a URI like s3://bucket/prefix"
                ) from None
            self.local = False
        else:
            path = self.uri.removeprefix("file://")
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(path)
            self.local = True

    @classmethod
    def redact(cls, text: str) -> str:
        """``text`` with the secrets of any URI in it replaced by ``***``."""
        return cls._SECRET_RE.sub(
            lambda m: (m.group("a") or m.group("b")) + "***", text
        )

    def free_bytes(self) -> int | None:
        """Free bytes on the file system of a local folder (its nearest existing parent).

        None for object stores and where the file system cannot say.
        """
        import shutil

        if not self.local:
            return None
        path = self.root
        while not os.path.exists(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        try:
            return int(shutil.disk_usage(path).free)
        except OSError:
            return None

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def _info(self, path: str) -> Any:
        """``get_file_info(path)``; an object store that does not answer is one line.

        Raises:
            JacpipeError: an object store unreachable within :func:`answer_seconds`
                (no network, a wrong endpoint, a server that accepts and never
                replies, no credentials).
        """
        if self.local:
            return self.fs.get_file_info(path)
        try:
            return _within(answer_seconds() * 1.5, self.fs.get_file_info, path)
        except OSError as exc:
            raise JacpipeError(
                f"{self.display}: the object store did not answer "
                f"({self.redact(first_line(exc, limit=200))}); check the URI, the network "
                f"and the credentials, or use a local folder ({TIMEOUT_ENV} sets how long "
                "to wait)"
            ) from None

    def is_dir(self) -> bool:
        return self._info(self.root).type == pafs.FileType.Directory

    def kind(self, name: str) -> str:
        """``"file"``, ``"dir"`` or ``"missing"``."""
        t = self._info(self.path(name)).type
        if t == pafs.FileType.File:
            return "file"
        return "dir" if t == pafs.FileType.Directory else "missing"

    def exists(self, name: str) -> bool:
        return self._info(self.path(name)).type == pafs.FileType.File

    def size(self, name: str) -> int | None:
        info = self._info(self.path(name))
        return info.size if info.type == pafs.FileType.File else None

    def listdir(self) -> list[str]:
        """The names in the folder, sorted.

        Locally a name that is not UTF-8 comes back as Python's file-system
        decoding makes it (``surrogateescape``): :meth:`move` and :meth:`delete`
        still reach it, and :func:`shown_name` prints it.
        """
        if not self.is_dir():
            return []
        if self.local:
            return sorted(os.listdir(self.root))
        sel = pafs.FileSelector(self.root, recursive=False, allow_not_found=True)
        # A set: an object store may list a name twice (an object and a "dir/" marker).
        return sorted({i.base_name for i in self.fs.get_file_info(sel)})

    def makedirs(self) -> None:
        if not self.local and self.fs.get_file_info(self.root).type == pafs.FileType.File:
            # Object stores would happily put keys "under" an object.
            raise NotADirectoryError(errno.ENOTDIR, "an object with this name exists")
        self.fs.create_dir(self.root, recursive=True)

    def delete(self, name: str) -> None:
        try:
            if self.local:
                os.remove(self.path(name))
            else:
                self.fs.delete_file(self.path(name))
        except (FileNotFoundError, IsADirectoryError):
            pass

    def move(self, name: str, dest: str) -> None:
        """Rename ``name`` to ``dest`` (both relative to the folder; ``dest``'s folder is made)."""
        parent = dest.rpartition("/")[0]
        if self.local:  # os: a name that is not UTF-8 (see listdir) still moves
            if parent:
                os.makedirs(self.path(parent), exist_ok=True)
            os.replace(self.path(name), self.path(dest))
            return
        if parent:
            self.fs.create_dir(self.path(parent), recursive=True)
        self.fs.move(self.path(name), self.path(dest))

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write ``name`` so a reader sees the old or the new bytes, never a mix."""
        if not self.local:
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(data)
            return
        tmp = f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            with open(self.path(tmp), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(self.path(tmp), self.path(name))
        except BaseException:
            self.delete(tmp)  # a full disk leaves no temporary file behind
            raise

    def temp_name(self, name: str) -> str:
        """Where a file is written before it is ``finish``-ed as ``name``.

        Local: a hidden ``.NAME.<uuid>.tmp`` that readers skip. Object stores:
        ``name`` itself (see the class docstring).
        """
        if not self.local:
            return name
        return f".{name.removesuffix('.parquet')}.{uuid.uuid4().hex}.tmp"

    def open_sink(self, name: str) -> Any:
        if self.local:
            return open(self.path(name), "wb")
        return self.fs.open_output_stream(self.path(name))

    def finish(self, tmp: str, name: str, sink: Any) -> None:
        """Close a temp file durably and give it its final name."""
        if self.local:
            sink.flush()
            os.fsync(sink.fileno())
            sink.close()
            os.replace(self.path(tmp), self.path(name))
            return
        sink.close()  # the object appears now, whole
        if tmp != name:
            self.fs.move(self.path(tmp), self.path(name))

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(self.path(name)) as f:
            while chunk := f.read(8 * 2**20):
                h.update(chunk)
        return h.hexdigest()


def refuse_secret(value: str, what: str) -> None:
    """Refuse ``value`` if it holds credentials that would be stored where others can read them.

    Used for everything ``jacpipe submit`` puts into a job's entrypoint on the
    cluster (shown by ``jacpipe list`` and the dashboard).

    Raises:
        JacpipeError: ``value`` holds a secret; the message shows it masked.
    """
    if Storage.redact(value) != value:
        raise JacpipeError(
            f"{what} {Storage.redact(value)}: credentials in the URI would be stored in the "
            "job's entrypoint on the cluster (shown by `jacpipe list`); give the nodes "
            "credentials through their environment (AWS_ACCESS_KEY_ID, ...) or a role, "
            "and pass s3://bucket/prefix"
        )


#: How long, in seconds, an object store may take to answer before it is
#: called unreachable, unless :data:`TIMEOUT_ENV` says otherwise (pyarrow's
#: defaults retried for minutes: a host without network seemed to hang).
ANSWER_SECONDS = 10.0

#: The environment variable that overrides :data:`ANSWER_SECONDS`.
TIMEOUT_ENV = "JACPIPE_STORE_TIMEOUT"

#: Attempts of an S3 request (each bounded by a third of the answer time).
_S3_ATTEMPTS = 3


def answer_seconds() -> float:
    """How long an object store may take to answer: ``JACPIPE_STORE_TIMEOUT`` or the default.

    Raises:
        JacpipeError: the variable is set to anything but a number of seconds > 0.
    """
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return ANSWER_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise JacpipeError(
            f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0 (how long an object "
            f"store may take to answer; default {ANSWER_SECONDS:g})"
        )
    return value


def _bounded(fs: Any, seconds: float) -> Any:
    """``fs`` with its retries bounded by ``seconds`` where pyarrow allows it.

    Google Cloud Storage: ``retry_time_limit``. S3: each of :data:`_S3_ATTEMPTS`
    attempts connects and waits for data at most ``seconds / _S3_ATTEMPTS``
    (the AWS SDK's own default is 3 s a request; ``from_uri`` retried a request
    that never answers for about 100 s, and pyarrow's exit waits for it).
    """
    from datetime import timedelta

    if isinstance(fs, getattr(pafs, "GcsFileSystem", ())):
        rebuild, (options,) = fs.__reduce__()
        if options.get("retry_time_limit") is None:
            options["retry_time_limit"] = timedelta(seconds=seconds)
            return rebuild(options)
    elif isinstance(fs, getattr(pafs, "S3FileSystem", ())):
        _, (options,) = fs.__reduce__()
        for key in ("connect_timeout", "request_timeout"):
            if options.get(key, -1) <= 0:
                options[key] = seconds / _S3_ATTEMPTS
        strategy = pafs.AwsStandardS3RetryStrategy(max_attempts=_S3_ATTEMPTS)
        return pafs.S3FileSystem(**options, retry_strategy=strategy)
    return fs


def _within(seconds: float, call: Any, *args: Any) -> Any:
    """``call(*args)``, or :class:`TimeoutError` when it has not returned after ``seconds``.

    The call runs in a daemon thread, left behind on a timeout: a request that
    the store's own options cannot bound (a Google Cloud Storage server that
    accepts and never replies waits two minutes) does not hold the command.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = call(*args)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, name="jacpipe-store-answer", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def shown_name(name: str) -> str:
    """``name`` fit to print: bytes that are not UTF-8 (see ``Storage.listdir``) as ``\\xff``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
