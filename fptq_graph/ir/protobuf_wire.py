"""Just enough of protobuf's wire format to walk an ONNX file without parsing it into a message.

Parsing a file into a ModelProto holds the file's bytes and the message at once (twice the weights),
and protobuf messages cannot be serialized past 2 GiB. Walking the encoding instead lets the loader
map each initializer's raw bytes straight from the file and the writer stream them into it.
See https://protobuf.dev/programming-guides/encoding/.
"""
from __future__ import annotations

from typing import Iterator

VARINT, I64, LEN, I32 = 0, 1, 2, 5


def read_varint(buf, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, where the field's key starts, where its value starts, where it ends)
    for each field of the message encoded in buf[start:end]."""
    pos = start
    while pos < end:
        tag, value_start = read_varint(buf, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == VARINT:
            _, value_end = read_varint(buf, value_start)
        elif wire_type == I64:
            value_end = value_start + 8
        elif wire_type == I32:
            value_end = value_start + 4
        elif wire_type == LEN:
            length, value_start = read_varint(buf, value_start)
            value_end = value_start + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} at byte {pos}")
        if value_end > end:
            raise ValueError(f"field {number} at byte {pos} runs past the end of its message (truncated file?)")
        yield number, wire_type, pos, value_start, value_end
        pos = value_end
