"""Bundle chunk messages framed by hand: the bytes protobuf writes, without building a message.

A bundle moves as a stream of messages that each carry one chunk of it. Building a protobuf
message per chunk copies the chunk into the message and again into its serialized form; framing
writes the field's tag and length around the chunk instead (one copy), byte for byte what
`SerializeToString` gives for the same message. `read_download_chunk` takes the framed form as a
view and hands anything else (any other valid encoding) to the full protobuf parse.
"""

from __future__ import annotations

from protocols.v1 import baton_pb2 as pb

__all__ = ["download_chunk", "hand_back_chunk", "read_download_chunk", "varint"]

# Wire tags (field number << 3 | 2 for length-delimited, 0 for varint).
_UPLOAD_DATA = b"\x12"  # UploadRequest.data = 2 and HandBackRequest.data = 2 (oneof `part`)
_CHUNK_DATA = 0x0A  # Chunk.data = 1
_CHUNK_OFFSET = 0x10  # Chunk.offset = 2
_CHUNK_TOTAL = 0x18  # Chunk.total_size = 3


def varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf base-128 varint."""
    if value < 0:
        raise ValueError("a varint here is never negative")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hand_back_chunk(data: bytes | memoryview) -> bytes:
    """`HandBackRequest(data=data)` (and `UploadRequest(data=data)`) serialized."""
    return b"".join((_UPLOAD_DATA, varint(len(data)), data))


def download_chunk(data: bytes | memoryview, offset: int, total_size: int) -> bytes:
    """`Chunk(data=data, offset=offset, total_size=total_size)` serialized (proto3: fields
    at their default are left out)."""
    parts: list[bytes | memoryview] = []
    if len(data):
        parts += [bytes((_CHUNK_DATA,)), varint(len(data)), data]
    if offset:
        parts += [bytes((_CHUNK_OFFSET,)), varint(offset)]
    if total_size:
        parts += [bytes((_CHUNK_TOTAL,)), varint(total_size)]
    return b"".join(parts)


def _read_varint(message: bytes, position: int) -> tuple[int, int] | None:
    """(value, position after it), or None if no complete varint of <= 10 bytes starts there."""
    value = shift = 0
    for index in range(position, min(len(message), position + 10)):
        byte = message[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    return None


def _framed_download_chunk(message: bytes) -> tuple[memoryview, int, int] | None:
    """The fields of a `Chunk` in the form `download_chunk` writes, or None for any other."""
    data = memoryview(message)[:0]
    position = 0
    if message[:1] == bytes((_CHUNK_DATA,)):
        read = _read_varint(message, 1)
        if read is None or read[1] + read[0] > len(message):
            return None
        length, position = read
        data = memoryview(message)[position : position + length]
        position += length
    numbers = []
    for tag in (_CHUNK_OFFSET, _CHUNK_TOTAL):
        value = 0
        if position < len(message) and message[position] == tag:
            read = _read_varint(message, position + 1)
            if read is None:
                return None
            value, position = read
        numbers.append(value)
    if position != len(message) or any(n >= 1 << 64 for n in numbers):
        return None
    return data, numbers[0], numbers[1]


def read_download_chunk(message: bytes) -> tuple[memoryview, int, int]:
    """(data, offset, total_size) of a serialized `Chunk`; `data` is a view into `message`.

    Raises:
        google.protobuf.message.DecodeError: `message` is not a `Chunk`.
    """
    framed = _framed_download_chunk(message)
    if framed is not None:
        return framed
    chunk = pb.Chunk.FromString(message)
    return memoryview(chunk.data), chunk.offset, chunk.total_size
