"""Stitching one-row-group Parquet files into one file: the footer's Thrift, by hand.

A part's row groups are encoded each into its own in-memory Parquet file (so
several threads can encode at once, see :class:`pipeline.store.parts.PartWriter`)
and written in order after one ``PAR1``. Page bytes hold no absolute offsets,
so only the footer changes: the row groups' file offsets shift by where each
group lands, ``ordinal`` becomes its index, and ``num_rows`` is the sum. The
footer is Thrift compact protocol; this module reads it into plain lists and
writes it back byte for byte (a round trip of an unchanged footer is exact).

NOTE: pyarrow has no API to append encoded row groups to a file, and no Thrift
library is a dependency; the compact protocol needs ~100 lines.
"""

from __future__ import annotations

import struct
from typing import Any

MAGIC = b"PAR1"
_STRUCT, _LIST, _SET, _MAP = 12, 9, 10, 11
_BOOL_T, _BOOL_F, _BYTE, _I16, _I32, _I64, _DOUBLE, _BINARY = 1, 2, 3, 4, 5, 6, 7, 8

# Field ids (parquet.thrift).
_FMD_NUM_ROWS, _FMD_ROW_GROUPS = 3, 4
_RG_COLUMNS, _RG_FILE_OFFSET, _RG_ORDINAL = 1, 5, 7
_CC_FILE_OFFSET, _CC_META, _CC_OFFSET_INDEX, _CC_COLUMN_INDEX = 2, 3, 4, 6
_CMD_OFFSETS = (9, 10, 11, 14)  # data, index, dictionary page offsets; bloom filter


class _Reader:
    def __init__(self, buf: bytes | memoryview) -> None:
        self.buf, self.pos = buf, 0

    def byte(self) -> int:
        b = self.buf[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        shift = out = 0
        while True:
            b = self.byte()
            out |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return out

    def zigzag(self) -> int:
        v = self.varint()
        return (v >> 1) ^ -(v & 1)

    def value(self, t: int) -> Any:
        if t in (_BOOL_T, _BOOL_F):  # only inside containers: one byte
            return self.byte()
        if t == _BYTE:
            return self.byte()
        if t in (_I16, _I32, _I64):
            return self.zigzag()
        if t == _DOUBLE:
            self.pos += 8
            return self.buf[self.pos - 8 : self.pos]
        if t == _BINARY:
            size = self.varint()
            self.pos += size
            return self.buf[self.pos - size : self.pos]
        if t == _STRUCT:
            return self.struct()
        if t in (_LIST, _SET):
            head = self.byte()
            size = head >> 4 if head >> 4 != 15 else self.varint()
            return (head & 0x0F, [self.value(head & 0x0F) for _ in range(size)])
        if t == _MAP:
            size = self.varint()
            kv = self.byte() if size else 0
            return (kv, [(self.value(kv >> 4), self.value(kv & 0x0F)) for _ in range(size)])
        raise ValueError(f"parquet footer: unknown Thrift compact type {t}")

    def struct(self) -> list[list[Any]]:
        """A struct as ``[[field_id, type, value], ...]`` in wire order."""
        fields, last = [], 0
        while True:
            head = self.byte()
            if head == 0:
                return fields
            t, delta = head & 0x0F, head >> 4
            fid = last + delta if delta else self.zigzag()
            value = True if t == _BOOL_T else False if t == _BOOL_F else self.value(t)
            fields.append([fid, t, value])
            last = fid


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, v: int) -> None:
        while True:
            if v < 0x80:
                self.out.append(v)
                return
            self.out.append((v & 0x7F) | 0x80)
            v >>= 7

    def zigzag(self, v: int) -> None:
        self.varint((v << 1) ^ (v >> 63))

    def value(self, t: int, v: Any) -> None:
        if t in (_BOOL_T, _BOOL_F, _BYTE):
            self.out.append(v)
        elif t in (_I16, _I32, _I64):
            self.zigzag(v)
        elif t == _DOUBLE:
            self.out += v
        elif t == _BINARY:
            self.varint(len(v))
            self.out += v
        elif t == _STRUCT:
            self.struct(v)
        elif t in (_LIST, _SET):
            et, items = v
            if len(items) < 15:
                self.out.append(len(items) << 4 | et)
            else:
                self.out.append(0xF0 | et)
                self.varint(len(items))
            for item in items:
                self.value(et, item)
        elif t == _MAP:
            kv, items = v
            self.varint(len(items))
            if items:
                self.out.append(kv)
            for key, val in items:
                self.value(kv >> 4, key)
                self.value(kv & 0x0F, val)

    def struct(self, fields: list[list[Any]]) -> None:
        last = 0
        for fid, t, v in fields:
            wire = (_BOOL_T if v else _BOOL_F) if t in (_BOOL_T, _BOOL_F) else t
            if 0 < fid - last <= 15:
                self.out.append((fid - last) << 4 | wire)
            else:
                self.out.append(wire)
                self.zigzag(fid)
            if t not in (_BOOL_T, _BOOL_F):
                self.value(t, v)
            last = fid
        self.out.append(0)


def _get(fields: list[list[Any]], fid: int) -> list[Any] | None:
    return next((f for f in fields if f[0] == fid), None)


def split(file: bytes | memoryview) -> tuple[bytes | memoryview, list[list[Any]]]:
    """``(row-group bytes between the magics and the footer, parsed footer)`` of a file.

    Raises:
        ValueError: not a Parquet file.
    """
    if bytes(file[:4]) != MAGIC or bytes(file[-4:]) != MAGIC:
        raise ValueError("not a Parquet file (no PAR1 magic)")
    size = struct.unpack("<I", bytes(file[-8:-4]))[0]
    footer = _Reader(bytes(file[-8 - size : -8])).struct()
    return file[4 : len(file) - 8 - size], footer


def row_groups(footer: list[list[Any]]) -> list[list[list[Any]]]:
    """The footer's row-group structs (empty when it has none)."""
    field = _get(footer, _FMD_ROW_GROUPS)
    return [] if field is None else field[2][1]


def shift_row_group(group: list[list[Any]], delta: int, ordinal: int) -> list[list[Any]]:
    """A copy of a row-group struct with every file offset moved by ``delta`` bytes.

    Raises:
        ValueError: the group has a page index (its offsets point into a footer).
    """
    out = []
    for fid, t, v in group:
        if fid == _RG_FILE_OFFSET:
            v = v + delta
        elif fid == _RG_ORDINAL:
            v = ordinal
        elif fid == _RG_COLUMNS:
            v = (v[0], [_shift_column(c, delta) for c in v[1]])
        out.append([fid, t, v])
    return out


def _shift_column(chunk: list[list[Any]], delta: int) -> list[list[Any]]:
    out = []
    for fid, t, v in chunk:
        if fid in (_CC_OFFSET_INDEX, _CC_COLUMN_INDEX):
            raise ValueError("parquet footer: page indexes are not stitched (write_page_index)")
        if fid == _CC_FILE_OFFSET:
            v = v + delta
        elif fid == _CC_META:
            v = [[f, ft, fv + delta if f in _CMD_OFFSETS else fv] for f, ft, fv in v]
        out.append([fid, t, v])
    return out


def stitched_footer(
    template: list[list[Any]], groups: list[list[list[Any]]], num_rows: int
) -> bytes:
    """``template`` with ``groups`` as its row groups and ``num_rows`` rows, encoded.

    The ``row_groups`` field is written even when empty (pyarrow's own files
    always carry it).
    """
    out = []
    for fid, t, v in template:
        if fid == _FMD_NUM_ROWS:
            v = num_rows
        elif fid == _FMD_ROW_GROUPS:
            v = (_STRUCT, groups)
        out.append([fid, t, v])
    w = _Writer()
    w.struct(out)
    return bytes(w.out)


def encode(footer: list[list[Any]]) -> bytes:
    """A parsed footer encoded again (exact round trip)."""
    w = _Writer()
    w.struct(footer)
    return bytes(w.out)
