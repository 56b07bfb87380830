"""Hand-framed chunk messages are byte for byte what protobuf writes, and read back the same."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.chunk_wire import download_chunk, hand_back_chunk, read_download_chunk, varint
from protocols.v1 import baton_pb2 as pb

# Sizes around the varint length boundaries (1, 2, 3 bytes) and a real 1 MiB chunk.
SIZES = [0, 1, 127, 128, 16_383, 16_384, 1024 * 1024]
U64 = st.integers(min_value=0, max_value=(1 << 64) - 1)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_a_framed_hand_back_chunk_is_the_serialized_message(data: bytes) -> None:
    framed = hand_back_chunk(memoryview(data))
    assert framed == pb.HandBackRequest(data=data).SerializeToString()
    assert framed == pb.UploadRequest(data=data).SerializeToString()
    assert pb.HandBackRequest.FromString(framed).data == data


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), offset=U64, total_size=U64)
def test_a_framed_download_chunk_is_the_serialized_message(
    data: bytes, offset: int, total_size: int
) -> None:
    framed = download_chunk(memoryview(data), offset, total_size)
    assert framed == pb.Chunk(data=data, offset=offset, total_size=total_size).SerializeToString()
    view, got_offset, got_total = read_download_chunk(framed)
    assert (bytes(view), got_offset, got_total) == (data, offset, total_size)


@pytest.mark.parametrize("size", SIZES)
def test_framing_holds_at_the_length_boundaries(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert hand_back_chunk(data) == pb.HandBackRequest(data=data).SerializeToString()
    framed = download_chunk(data, 3 * size, 7 * size)
    assert framed == pb.Chunk(data=data, offset=3 * size, total_size=7 * size).SerializeToString()
    view, offset, total = read_download_chunk(framed)
    assert view.obj is framed  # a view of the received message, not a copy
    assert (view, offset, total) == (data, 3 * size, 7 * size)


@settings(max_examples=500, deadline=None)
@given(received=st.binary(max_size=64))
def test_any_message_reads_as_the_full_parse_does(received: bytes) -> None:
    try:
        expected = pb.Chunk.FromString(received)
    except DecodeError:
        with pytest.raises(DecodeError):
            read_download_chunk(received)
        return
    view, offset, total = read_download_chunk(received)
    assert (bytes(view), offset, total) == (expected.data, expected.offset, expected.total_size)


def test_other_encodings_of_a_chunk_get_the_full_parse() -> None:
    # Fields out of order, and a field repeated (protobuf keeps the last one).
    reordered = b"\x18\x05" + b"\x10\x02" + b"\x0a\x03abc"
    assert tuple(read_download_chunk(reordered))[1:] == (2, 5)
    assert bytes(read_download_chunk(reordered)[0]) == b"abc"
    repeated = download_chunk(b"abc", 1, 9) + download_chunk(b"de", 4, 9)
    view, offset, total = read_download_chunk(repeated)
    assert (bytes(view), offset, total) == (b"de", 4, 9)


def test_a_truncated_chunk_is_refused() -> None:
    with pytest.raises(DecodeError):
        read_download_chunk(download_chunk(b"x" * 300, 0, 300)[:-5])


def test_varint_refuses_a_negative_value() -> None:
    assert varint(0) == b"\x00" and varint(300) == b"\xac\x02"
    with pytest.raises(ValueError, match="never negative"):
        varint(-1)
