"""Parquet codecs: what ``--compression`` accepts, parsed once for the planner and the writer."""

from __future__ import annotations

from pipeline.core.errors import JacpipeError

#: Parquet codecs of ``--compression`` (``zstd:LEVEL`` picks a zstd level).
CODECS = ("zstd", "lz4", "snappy", "none")
#: ``--compression auto``: one of CODECS, chosen before a run by measured encode
#: and disk rates (pipeline/store/throughput.py) and recorded in the manifest;
#: a resume keeps the manifest's codec. Never handed to a writer.
AUTO = "auto"
#: The default codec, chosen by measurement (README, Benchmarks: Scale).
DEFAULT_COMPRESSION = "zstd"


def parse_compression(text: str) -> tuple[str, int | None]:
    """``(codec, level)`` of a ``--compression`` value such as ``zstd``, ``zstd:3`` or ``none``.

    ``auto`` parses as ``("auto", None)``; it is resolved to a codec before any
    part is written.

    Raises:
        JacpipeError: an unknown codec or a bad level.
    """
    codec, _, level = str(text).partition(":")
    if codec not in (AUTO, *CODECS):
        raise JacpipeError(
            f"--compression must be one of {AUTO}, {', '.join(CODECS)} (zstd:LEVEL for a zstd "
            f"level), got {text!r}"
        )
    if not level:
        return codec, None
    if codec != "zstd" or not level.lstrip("-").isdigit() or not -7 <= int(level) <= 22:
        raise JacpipeError(
            f"--compression: only zstd takes a level, from -7 to 22 (e.g. zstd:3), got {text!r}"
        )
    return codec, int(level)
