"""Measured write rates and ``--compression auto``: the codec the writer or the disk allows.

A part is committed in two phases: encoder threads (Parquet pages,
compressed) overlapped with the writer's thread (sha256 of the encoded
bytes, written into the page cache), then the ``fsync`` of the part, which
waits for the disk: a part is far smaller than the kernel lets stay dirty
before writing back, so the disk works after the CPUs, not beside them. In
seconds per raw byte of values::

    1 / committed(codec) = max(1 / encode + ratio / (hash * T), ratio / hash)
                           + ratio / disk

where ``encode`` is the rate of the ``T`` encoder threads over raw bytes,
``hash`` sha256's rate on one thread (it shares the ``T`` cores with the
encoders) and ``ratio`` the encoded size over the raw size. (Modelled as
overlapped stages, ``min(encode, hash / ratio, disk / ratio)``, it ranked
``none`` above lz4 and snappy on banded rows on 2 cores, where PartWriter
committed 72 MB/s with ``none`` and 122 MB/s with lz4.) ``auto`` measures these in the
run (a short probe write in the output folder, a short encode of two samples
on the host's threads), and takes the codec that commits fastest
(:func:`choose_codec`, a pure function of the rates).

NOTE: [Two probe samples]
    The codec is chosen before any row exists, and a codec's speed and ratio
    depend on the data: on random-looking floats (a dense MLP Jacobian, the
    issue-27 GPU case) ``none`` encodes fastest and zstd shrinks by 15 %; on
    rows that are mostly zeros (a banded Jacobian stored dense) zstd and lz4
    shrink 100-1000x and commit faster than ``none``, which writes every
    byte. Measured on random-looking samples alone, ``auto`` chose ``none``
    for such rows: 0.76x zstd's rate and 694x its bytes (benchmarks/codecs.py).
    So the probe encodes both kinds, random-looking and banded rows, and
    ``auto`` takes the codec whose *worse* case is best: the highest
    ``min over samples of committed(codec) / committed(fastest codec)``.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.core.codec import CODECS, DEFAULT_COMPRESSION
from pipeline.store.storage import Storage

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

#: Bytes written by the disk probe (in PROBE_BLOCK pieces, then ``fsync``).
PROBE_BYTES = 64 * 2**20
PROBE_BLOCK = 8 * 2**20
#: Raw bytes of one encoding piece of the encode probe (one per thread).
SAMPLE_BYTES = 2 * 2**20
#: Name prefix of the probe file (a leftover if a run dies mid-probe; swept).
PROBE_PREFIX = ".probe-"
#: Codecs whose worse case is within this of the best count as equally good: the
#: smallest of them is taken (fewer bytes on disk for no measurable time).
TIE = 0.05

_DISK_CACHE: dict[Any, float] = {}
_ENCODE_CACHE: dict[Any, dict[str, dict[str, EncodeRate]]] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class EncodeRate:
    """One codec's measured encoding.

    Args:
        rate: raw bytes encoded per second, all encoder threads together.
        ratio: encoded bytes / raw bytes (1.0: no smaller).
    """

    rate: float
    ratio: float


def committed_rate(encode: EncodeRate, disk: float, *, hash_rate: float = float("inf"),
                   threads: int = 1) -> float:
    """Raw bytes per second committed with this codec (the module docstring's model).

    Args:
        encode: the codec's rate on ``threads`` encoder threads, and its ratio.
        disk: the disk's sequential write rate.
        hash_rate: sha256 bytes per second on one thread.
        threads: the encoder threads, on as many cores, that the hash shares.
    """
    ratio = max(encode.ratio, 1e-9)
    cpu = max(1.0 / encode.rate + ratio / (hash_rate * max(1, threads)), ratio / hash_rate)
    return 1.0 / (cpu + ratio / disk)


def choose_codec(
    encode: Mapping[str, Mapping[str, EncodeRate]] | Mapping[str, EncodeRate],
    disk: float | None, *, hash_rate: float = float("inf"), threads: int = 1,
) -> str:
    """The codec whose worst case commits fastest (NOTE: [Two probe samples]).

    Pure: rates in, codec out. For each sample, a codec's committed rate is
    divided by the fastest codec's on that sample; the codec with the
    highest minimum over the samples wins. Codecs within :data:`TIE` of it
    count as equally good, and the one with the smallest output (mean ratio)
    of them wins.

    Args:
        encode: per sample, each candidate codec's :class:`EncodeRate` (or
            one sample's rates: ``{codec: EncodeRate}``).
        disk: the disk's sequential write rate (bytes/s); None when unknown
            (an object store): then :data:`~pipeline.core.codec.DEFAULT_COMPRESSION`.
        hash_rate: sha256 bytes per second of the writer's thread.
        threads: the encoder threads the rates were measured on.

    Returns:
        A codec named in every sample.
    """
    samples = _by_sample(encode)
    codecs = set.intersection(*(set(r) for r in samples.values())) if samples else set()
    if disk is None or not codecs:
        return DEFAULT_COMPRESSION
    worst = {c: 1.0 for c in codecs}
    for rates in samples.values():
        rate = {c: committed_rate(rates[c], disk, hash_rate=hash_rate, threads=threads)
                for c in codecs}
        fastest = max(rate.values())
        for c in codecs:
            worst[c] = min(worst[c], rate[c] / fastest)
    best = max(worst.values())
    near = [c for c in codecs if worst[c] >= best - TIE]
    return min(near, key=lambda c: (sum(r[c].ratio for r in samples.values()), -worst[c], c))


def _by_sample(encode: Mapping[str, Any]) -> dict[str, Mapping[str, EncodeRate]]:
    """``{sample: {codec: EncodeRate}}``, also from one sample's ``{codec: EncodeRate}``."""
    if any(isinstance(v, EncodeRate) for v in encode.values()):
        return {"sample": encode}
    return dict(encode)


#: The probe's samples (NOTE: [Two probe samples]).
SAMPLES = ("random-looking", "banded")


@dataclass
class AutoChoice:
    """What ``--compression auto`` measured and chose; the manifest's ``compression_auto``.

    ``encode``: per sample (:data:`SAMPLES`), each codec's :class:`EncodeRate`.
    """

    codec: str
    disk_bytes_per_s: float | None
    hash_bytes_per_s: float
    threads: int
    encode: dict[str, dict[str, EncodeRate]] = field(default_factory=dict)
    disk_probe: str = "measured"

    def line(self) -> str:
        """One line for the run's notes: the codec, and the rates that chose it."""
        disk = self.disk_bytes_per_s
        samples = list(self.encode.values())
        codecs = list(samples[0]) if samples else []
        rates = ", ".join(
            c + " " + "|".join(f"{r[c].rate / 1e6:,.0f}" for r in samples) + " MB/s x"
            + "|".join(f"{r[c].ratio:.2g}" for r in samples) for c in codecs)
        where = f"disk {disk / 1e6:,.0f} MB/s" if disk is not None else f"disk {self.disk_probe}"
        return (f"--compression auto: {self.codec} ({where}; encoding "
                f"{' | '.join(self.encode)} rows on {self.threads} thread(s): {rates})")

    def to_json(self) -> dict[str, Any]:
        disk = self.disk_bytes_per_s
        return {
            "codec": self.codec,
            "disk_bytes_per_s": None if disk is None else round(disk),
            "disk_probe": self.disk_probe,
            "hash_bytes_per_s": round(self.hash_bytes_per_s),
            "threads": self.threads,
            "encode": {sample: {c: {
                "bytes_per_s": round(e.rate), "ratio": round(e.ratio, 4),
                "committed_bytes_per_s": None if disk is None else round(
                    committed_rate(e, disk, hash_rate=self.hash_bytes_per_s,
                                   threads=self.threads))}
                for c, e in rates.items()} for sample, rates in self.encode.items()},
        }


def auto_codec(storage: Storage, schema: pa.Schema, *, threads: int | None = None,
               codecs: Sequence[str] = CODECS) -> AutoChoice:
    """Measure the rates for a run writing ``schema`` parts into ``storage``, and choose.

    Args:
        storage: the output folder (the disk probe writes there).
        schema: the parts' schema (the encode probe's sample has its columns).
        threads: encoder threads [default: the CPUs this process may use].
        codecs: the candidates.
    """
    threads = threads or host_threads()
    disk = disk_rate(storage)
    probe = "measured" if disk is not None else "none (not a local folder)"
    if disk is None and storage.local:
        probe = "none (too little free space)"
    # Unmeasured disk: the default codec, whatever the encoders do (no encode probe).
    encode = {} if disk is None else encode_rates(schema, threads=threads, codecs=codecs)
    hashed = hash_rate()
    codec = choose_codec(encode, disk, hash_rate=hashed, threads=threads)
    return AutoChoice(codec=codec, disk_bytes_per_s=disk,
                      hash_bytes_per_s=hashed, threads=threads, encode=encode, disk_probe=probe)


def host_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def disk_rate(storage: Storage, *, size: int = PROBE_BYTES, cached: bool = True) -> float | None:
    """Sequential write rate (bytes/s, ``fsync`` included) of a local folder's disk.

    A probe file of ``size`` bytes is written into the folder (which must
    exist) and removed. Measured once per device and process unless
    ``cached`` is False. None for object stores, and where the file system
    has less than four times ``size`` free.
    """
    if not storage.local:
        return None
    key = os.stat(storage.root).st_dev
    with _LOCK:
        if cached and key in _DISK_CACHE:
            return _DISK_CACHE[key]
    free = storage.free_bytes()
    if free is not None and free < 4 * size:
        return None
    name = f"{PROBE_PREFIX}{uuid.uuid4().hex}.tmp"
    block = _noise(min(size, PROBE_BLOCK))  # no file system compresses it
    written = 0
    try:
        t0 = time.perf_counter()
        with open(storage.path(name), "wb") as f:
            while written < size:
                written += f.write(block[: size - written])
            f.flush()
            os.fsync(f.fileno())
        rate = written / max(time.perf_counter() - t0, 1e-9)
    finally:
        storage.delete(name)
    with _LOCK:
        _DISK_CACHE[key] = rate
    return rate


def hash_rate(size: int = 16 * 2**20) -> float:
    """sha256 bytes per second on one thread (the writer's checksum)."""
    data = bytes(size)  # sha256 takes the same time whatever the bytes
    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        hashlib.sha256(data).digest()
        best = min(best, time.perf_counter() - t0)
    return size / max(best, 1e-9)


def encode_rates(schema: pa.Schema, *, threads: int, codecs: Sequence[str] = CODECS,
                 cached: bool = True) -> dict[str, dict[str, EncodeRate]]:
    """Each codec's rate and ratio per sample, ``threads`` pieces of it encoded at once.

    NOTE: [Two probe samples] (a schema with variable-length rows, the sparse
    layout, has no banded sample: it stores nonzeros only). Best of two
    rounds per codec (the first warms the allocator and the codec's tables).
    """
    from pipeline.store.parts import _encode_group, writer_options

    key = (schema.remove_metadata(), threads, tuple(codecs))
    with _LOCK:
        if cached and key in _ENCODE_CACHE:
            return _ENCODE_CACHE[key]
    import pyarrow as pa

    kinds = SAMPLES[:1] if any(pa.types.is_list(f.type) for f in schema) else SAMPLES
    out: dict[str, dict[str, EncodeRate]] = {}
    with ThreadPoolExecutor(threads, thread_name_prefix="jacpipe-probe") as pool:
        for kind in kinds:
            pieces = [sample_table(schema, seed=i, banded=kind != SAMPLES[0])
                      for i in range(threads)]
            raw = sum(p.nbytes for p in pieces)
            out[kind] = {}
            for codec in codecs:
                options = writer_options(schema, codec)
                best, size = float("inf"), 0
                for _ in range(2):
                    t0 = time.perf_counter()
                    done = [f.result()[0] for f in
                            [pool.submit(_encode_group, p, schema, options) for p in pieces]]
                    best = min(best, time.perf_counter() - t0)
                    size = sum(b.size for b in done)
                out[kind][codec] = EncodeRate(rate=raw / max(best, 1e-9), ratio=size / raw)
    with _LOCK:
        _ENCODE_CACHE[key] = out
    return out


def sample_table(schema: pa.Schema, *, seed: int = 0, nbytes: int = SAMPLE_BYTES,
                 banded: bool = False) -> pa.Table:
    """About ``nbytes`` of rows of ``schema`` for the encode probe (NOTE: [Two probe samples]).

    Integer columns count rows; float lists hold normal draws (fixed-size
    lists of their width, variable lists of 64 entries with sorted columns),
    or with ``banded`` zeros but for 7 entries a row about the diagonal.
    """
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    width = sum(_row_bytes(f.type) for f in schema)
    rows = max(1, nbytes // max(width, 1))
    arrays = [_sample_column(f.type, rows, rng, banded=banded) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema.remove_metadata())


def _noise(size: int) -> bytes:
    """``size`` random bytes, quickly (``os.urandom`` and ``Generator.bytes`` are slower)."""
    import numpy as np

    words = np.random.default_rng(0).integers(0, 2**63, -(-size // 8), dtype=np.int64)
    return words.tobytes()[:size]


#: Entries per row of a variable-length (sparse) column in the sample.
_SPARSE_ROW = 64


def _row_bytes(kind: pa.DataType) -> int:
    import pyarrow as pa

    if pa.types.is_fixed_size_list(kind):
        return kind.list_size * kind.value_type.bit_width // 8
    if pa.types.is_list(kind):
        return _SPARSE_ROW * kind.value_type.bit_width // 8
    return kind.bit_width // 8


def _sample_column(kind: pa.DataType, rows: int, rng: np.random.Generator, *,
                   banded: bool) -> pa.Array:
    import numpy as np
    import pyarrow as pa

    from pipeline.store.arrays import arrow_array

    if pa.types.is_integer(kind):
        return arrow_array(np.arange(rows, dtype=np.int64), kind)
    floats = f"float{kind.value_type.bit_width}"
    if pa.types.is_fixed_size_list(kind):
        flat = rng.standard_normal(rows * kind.list_size).astype(floats)
        if banded:
            width, k = kind.list_size, min(7, kind.list_size)
            band = np.zeros((rows, width), dtype=floats)
            at = (np.arange(rows)[:, None] + np.arange(k)[None, :] - k // 2) % width
            band[np.arange(rows)[:, None], at] = flat[: rows * k].reshape(rows, k)
            flat = band.reshape(-1)
        return pa.FixedSizeListArray.from_arrays(arrow_array(flat, kind.value_type), type=kind)
    offsets = arrow_array(np.arange(0, (rows + 1) * _SPARSE_ROW, _SPARSE_ROW, dtype=np.int32))
    if pa.types.is_integer(kind.value_type):
        cols = np.sort(rng.integers(0, 2**20, (rows, _SPARSE_ROW)), axis=1).reshape(-1)
        return pa.ListArray.from_arrays(offsets, arrow_array(cols, kind.value_type))
    flat = rng.standard_normal(rows * _SPARSE_ROW).astype(floats)
    return pa.ListArray.from_arrays(offsets, arrow_array(flat, kind.value_type))
