"""Parquet codecs: what ``--compression`` accepts, parsed once for the planner and the writer."""

from __future__ import annotations

from pipeline.core.errors import JacpipeError

#: Parquet codecs of ``--compression`` (``zstd:LEVEL`` picks a zstd level).
CODECS = ("zstd", "lz4", "snappy", "none")
#: The default codec, chosen by measurement (README, Benchmarks: Scale).
DEFAULT_COMPRESSION = "zstd"


def parse_compression(text: str) -> tuple[str, int | None]:
    """``(codec, level)`` of a ``--compression`` value such as ``zstd``, ``zstd:3`` or ``none``.

    Raises:
        JacpipeError: an unknown codec or a bad level.
    """
    codec, _, level = str(text).partition(":")
    if codec not in CODECS:
        raise JacpipeError(
            f"--compression must be one of {', '.join(CODECS)} (zstd:LEVEL for a zstd level), "
            f"got {text!r}"
        )
    if not level:
        return codec, None
    if codec != "zstd" or not level.lstrip("-").isdigit() or not -7 <= int(level) <= 22:
        raise JacpipeError(
            f"--compression: only zstd takes a level, from -7 to 22 (e.g. zstd:3), got {text!r}"
        )
    return codec, int(level)
