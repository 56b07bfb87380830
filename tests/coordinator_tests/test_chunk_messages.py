"""Bundle chunks are taken from the received message without a parse (no copy of the bytes), and
download chunks framed by the store go out as they are (no message built per chunk)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from google.protobuf.message import Message
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.servicer import DataChunk, FramedChunk, MalformedMessageGuard
from protocols.chunk_wire import download_chunk
from protocols.v1 import baton_pb2 as pb

HAND_BACK = "/baton.v1.SiteService/HandBackHop"
UPLOAD = "/baton.v1.SiteService/UploadCheckpoint"
MESSAGES: dict[str, type[Message]] = {HAND_BACK: pb.HandBackRequest, UPLOAD: pb.UploadRequest}


def _deserializer(method: str) -> Any:
    """The request deserializer the coordinator's interceptor puts on `method`."""
    message = MESSAGES.get(method, pb.UploadRequest)
    inner = grpc.stream_unary_rpc_method_handler(
        lambda requests, context: None, request_deserializer=message.FromString
    )

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return inner

    guard = MalformedMessageGuard(ledger=None)  # type: ignore[arg-type]  # refusals not reached
    handler = asyncio.run(guard.intercept_service(continuation, SimpleNamespace(method=method)))
    return handler.request_deserializer


@pytest.mark.parametrize("method", [HAND_BACK, UPLOAD])
@pytest.mark.parametrize("size", [0, 1, 127, 128, 16_383, 16_384, 1024 * 1024 + 3])
def test_a_data_chunk_is_a_view_of_the_received_message_not_a_copy(method: str, size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    received = MESSAGES[method](data=payload).SerializeToString()
    parsed = _deserializer(method)(received)
    assert isinstance(parsed, DataChunk)
    assert parsed.WhichOneof("part") == "data"
    assert isinstance(parsed.data, memoryview) and parsed.data.obj is received
    assert parsed.data == payload


@pytest.mark.parametrize("method", [HAND_BACK, UPLOAD])
def test_headers_results_and_other_encodings_get_the_full_parse(method: str) -> None:
    kind = MESSAGES[method]
    deserialize = _deserializer(method)
    header = kind(header=pb.UploadHeader(hop_id="h", total_size=3)).SerializeToString()
    assert deserialize(header) == kind.FromString(header)
    first, second = kind(data=b"abc").SerializeToString(), kind(data=b"de").SerializeToString()
    # Two chunks in one message: protobuf keeps the last one, as the full parse does.
    both = deserialize(first + second)
    assert isinstance(both, kind) and both.data == b"de"
    if method == HAND_BACK:
        last = pb.HandBackRequest(result=pb.HopResult(hop_id="h", ok=True)).SerializeToString()
        assert deserialize(last) == pb.HandBackRequest.FromString(last)


def test_a_truncated_chunk_is_still_refused_as_malformed() -> None:
    received = pb.HandBackRequest(data=b"x" * 300).SerializeToString()
    parsed = _deserializer(HAND_BACK)(received[:-1])
    assert type(parsed).__name__ == "_Malformed"


def test_other_calls_keep_the_full_parse() -> None:
    received = pb.UploadRequest(data=b"abc").SerializeToString()
    assert isinstance(_deserializer("/baton.v1.SiteService/Other")(received), pb.UploadRequest)


@settings(max_examples=300, deadline=None)
@given(received=st.binary(max_size=64) | st.binary(max_size=40).map(
    lambda b: pb.HandBackRequest(data=b).SerializeToString() + b[:3]))  # fmt: skip
def test_a_chunk_taken_as_a_view_is_what_the_full_parse_reads(received: bytes) -> None:
    parsed = _deserializer(HAND_BACK)(received)
    if isinstance(parsed, DataChunk):
        full = pb.HandBackRequest.FromString(received)
        assert full.WhichOneof("part") == "data" and full.data == parsed.data


def _response_serializer(method: str) -> Any:
    """The response serializer the coordinator's interceptor puts on server-streaming `method`."""
    inner = grpc.unary_stream_rpc_method_handler(
        lambda request, context: None,
        request_deserializer=pb.DownloadRequest.FromString,
        response_serializer=pb.Chunk.SerializeToString,
    )

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return inner

    guard = MalformedMessageGuard(ledger=None)  # type: ignore[arg-type]  # refusals not reached
    handler = asyncio.run(guard.intercept_service(continuation, SimpleNamespace(method=method)))
    return handler.response_serializer


@pytest.mark.parametrize("method", ["/baton.v1.SiteService/DownloadCheckpoint",
                                    "/baton.v1.AdminService/DownloadFinalCheckpoint"])  # fmt: skip
def test_download_chunks_framed_by_the_store_go_out_as_they_are(method: str) -> None:
    wire = download_chunk(b"abc", 7, 10)
    serialize = _response_serializer(method)
    assert serialize(FramedChunk(wire)) is wire  # no copy, no message built
    chunk = pb.Chunk(data=b"abc", offset=7, total_size=10)
    assert serialize(chunk) == chunk.SerializeToString() == wire


def test_other_streams_keep_their_serializer() -> None:
    serialize = _response_serializer("/baton.v1.SiteService/StreamTasks")
    with pytest.raises(TypeError):
        serialize(FramedChunk(b"\x0a\x01x"))
