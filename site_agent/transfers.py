"""Checkpoint transfer with the coordinator, and calls that outlive a coordinator restart."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

import grpc

from protocols.checkpoint import AGGREGATOR, Bundle, CheckpointError, TensorValues, read_bundle
from protocols.chunk_wire import hand_back_chunk, read_download_chunk
from protocols.signing import SignatureError, verify_aggregate_custody, verify_custody
from protocols.transport import CHUNK_BYTES, WHOLE_HAND_BACK_BYTES
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from site_agent.metrics import SiteMetrics
from site_agent.settings import SiteSettings
from site_agent.task_checks import HopFailure

logger = logging.getLogger("site_agent.agent")

_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
# A finished result is asked about at least this often: a coordinator whose disk was full
# takes it within seconds of space being freed.
_RESULT_RETRY_MAX_DELAY = 5.0
T = TypeVar("T")
_SERVICE = "/baton.v1.SiteService/"


class SiteStub(pb_grpc.SiteServiceStub):
    """The generated stub, plus the calls that move bundles with hand-framed chunk messages
    (`protocols.chunk_wire`: the bytes protobuf would write, without a message per chunk)."""

    def __init__(self, channel: grpc.Channel) -> None:
        super().__init__(channel)  # type: ignore[call-arg]  # typed as a __new__ overload
        # Requests already serialized (bytes, passed through as they are).
        self.HandBackHopFramed = channel.stream_unary(
            _SERVICE + "HandBackHop", response_deserializer=pb.HopResultResponse.FromString
        )
        self.UploadCheckpointFramed = channel.stream_unary(
            _SERVICE + "UploadCheckpoint", response_deserializer=pb.UploadResponse.FromString
        )
        # Responses read as (data view, offset, total size), the chunk never copied out.
        self.DownloadCheckpointFramed = channel.unary_stream(
            _SERVICE + "DownloadCheckpoint",
            request_serializer=pb.DownloadRequest.SerializeToString,
            response_deserializer=read_download_chunk,
        )


def hand_back_frames(
    header: pb.UploadHeader, payload: bytes, result: pb.HopResult, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """The serialized messages of a hand back: its header, the bundle from `header.offset` in
    chunks, its result."""
    yield pb.HandBackRequest(header=header).SerializeToString()
    view = memoryview(payload)
    for start in range(header.offset, len(payload), chunk_bytes):
        yield hand_back_chunk(view[start : start + chunk_bytes])
    yield pb.HandBackRequest(result=result).SerializeToString()


def upload_frames(
    header: pb.UploadHeader, payload: bytes, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[bytes]:
    """The serialized messages of an upload: its header, then the bundle from `header.offset`."""
    yield pb.UploadRequest(header=header).SerializeToString()
    view = memoryview(payload)
    for start in range(header.offset, len(payload), chunk_bytes):
        yield hand_back_chunk(view[start : start + chunk_bytes])  # the same field number


class Transfers:
    """Downloads, upload chunking and retries of the site agent."""

    settings: SiteSettings
    metrics: SiteMetrics
    _stop: threading.Event
    _hand_back_unimplemented = False  # the coordinator predates HandBackHop: two calls
    _whole_unimplemented = False  # the coordinator predates HandBackHopWhole: the stream

    if TYPE_CHECKING:

        def _out_of_grace(self) -> bool: ...

    # ---- calls that outlive a coordinator restart -------------------------------------------

    def _retrying(
        self,
        what: str,
        call: Callable[[], T],
        *,
        lease_lost: threading.Event | None = None,
        on_retry: Callable[[], None] | None = None,
    ) -> T:
        """Retries `call` while the coordinator is unreachable or cannot store (e.g. its disk is
        full), with backoff, up to result_retry_seconds and, for a hop, while its lease holds.
        ``on_retry`` is called before each wait for a retry."""
        deadline = time.monotonic() + self.settings.result_retry_seconds
        delay = 0.5
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE or time.monotonic() > deadline:
                    raise
                if lease_lost is not None and lease_lost.is_set():
                    raise
                if on_retry is not None:
                    on_retry()
                logger.warning("%s not taken by the coordinator now (%s: %s); again in %.1f s",
                               what, exc.code().name, exc.details(), delay)  # fmt: skip
                if self._stop.wait(delay) or self._out_of_grace():
                    raise
                delay = min(delay * 2, self.settings.reconnect_max_seconds, _RESULT_RETRY_MAX_DELAY)

    def _download(self, stub: pb_grpc.SiteServiceStub, ref: pb.CheckpointRef) -> bytes:
        """Downloads a bundle, resuming from the last received byte after an interruption."""
        return self._download_checked(stub, ref)[0]

    def _download_checked(
        self, stub: pb_grpc.SiteServiceStub, ref: pb.CheckpointRef
    ) -> tuple[bytes, Bundle, dict[str, TensorValues]]:
        """`_download`, with what the bundle's checks found in it and its tensors' values."""
        buffer = bytearray()

        def fetch() -> bytes:
            request = pb.DownloadRequest(sha256=ref.sha256, offset=len(buffer))
            if isinstance(stub, SiteStub):
                chunks: Iterator[tuple[memoryview | bytes, int, int]] = (
                    stub.DownloadCheckpointFramed(request, timeout=600)
                )
            else:
                chunks = (
                    (c.data, c.offset, c.total_size)
                    for c in stub.DownloadCheckpoint(request, timeout=600)
                )
            for data, offset, total_size in chunks:
                if offset != len(buffer) or total_size != ref.size:
                    raise HopFailure("checkpoint-integrity", "download chunks out of order")
                buffer.extend(data)
            return bytes(buffer)

        data = self._retrying("download", fetch)
        self.metrics.checkpoint_bytes.labels(direction="download").inc(len(data))
        return (data, *self._checked_bundle(data, ref))

    def _checked_bundle(
        self, data: bytes, ref: pb.CheckpointRef
    ) -> tuple[Bundle, dict[str, TensorValues]]:
        """What the bundle holds and its tensors' values (as read by its checks, once), if it
        is the one referenced (hash, format, finite values) and its producer's custody
        signature holds."""
        try:
            bundle, values = read_bundle(data, expected_sha256=ref.sha256)
            ca_pem = self.settings.ca_certificate.read_bytes()
            if bundle.manifest.producer_site == AGGREGATOR:  # a round's aggregate
                verify_aggregate_custody(
                    bundle.sha256, ref.signature, ref.producer_certificate, ca_pem=ca_pem
                )
            else:
                verify_custody(
                    bundle.sha256,
                    ref.signature,
                    ref.producer_certificate,
                    ca_pem=ca_pem,
                    producer=bundle.manifest.producer_site,
                )
        except (CheckpointError, SignatureError) as exc:
            raise HopFailure("checkpoint-integrity", str(exc)) from exc
        return bundle, values

    @staticmethod
    def _upload_messages(header: pb.UploadHeader, payload: bytes) -> Iterator[pb.UploadRequest]:
        yield pb.UploadRequest(header=header)
        view = memoryview(payload)
        for start in range(header.offset, len(payload), CHUNK_BYTES):
            yield pb.UploadRequest(data=bytes(view[start : start + CHUNK_BYTES]))

    @staticmethod
    def _hand_back_messages(
        header: pb.UploadHeader, payload: bytes, result: pb.HopResult
    ) -> Iterator[pb.HandBackRequest]:
        yield pb.HandBackRequest(header=header)
        view = memoryview(payload)
        for start in range(header.offset, len(payload), CHUNK_BYTES):
            yield pb.HandBackRequest(data=bytes(view[start : start + CHUNK_BYTES]))
        yield pb.HandBackRequest(result=result)

    def _hand_back(
        self,
        stub: pb_grpc.SiteServiceStub,
        header: pb.UploadHeader,
        payload: bytes,
        result: pb.HopResult,
        lease_lost: threading.Event,
        on_retry: Callable[[], None] | None = None,
    ) -> pb.HopResultResponse:
        """Hands a finished hop back: its bundle and its result in one call (HandBackHop; a
        bundle up to `WHOLE_HAND_BACK_BYTES` in one message, HandBackHopWhole).

        A cut or unanswered call is resumed from what the coordinator holds (UploadStatus): a
        retry after the commit is answered "committed" again, nothing is sent twice over. A
        coordinator without HandBackHopWhole gets the stream; one without HandBackHop gets the
        upload and the result in two calls. ``on_retry``: called before each wait for a retry.
        """
        attempts = 0

        def send() -> pb.HopResultResponse:
            if len(payload) <= WHOLE_HAND_BACK_BYTES and not self._whole_unimplemented:
                try:
                    return self._hand_back_whole(stub, header, payload, result)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    logger.info("the coordinator takes no hand back in one message: streaming it")
                    self._whole_unimplemented = True
            if self._hand_back_unimplemented:
                return self._upload_then_report(stub, header, payload, result)
            try:
                response: pb.HopResultResponse
                if isinstance(stub, SiteStub):
                    response = stub.HandBackHopFramed(
                        hand_back_frames(header, payload, result), timeout=600
                    )
                else:
                    response = stub.HandBackHop(
                        self._hand_back_messages(header, payload, result), timeout=600
                    )
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                logger.info("the coordinator takes no hand back in one call: upload, then report")
                self._hand_back_unimplemented = True
                return self._upload_then_report(stub, header, payload, result)
            self.metrics.checkpoint_bytes.labels(direction="upload").inc(
                len(payload) - header.offset
            )
            return response

        def call() -> pb.HopResultResponse:
            nonlocal attempts
            attempts += 1
            uploaded = self._hand_back_unimplemented and header.offset == len(payload)
            if attempts > 1 and not uploaded:  # a first attempt starts at 0: nothing to ask
                header.offset = stub.UploadStatus(header, timeout=30).received
            try:
                return send()
            except grpc.RpcError as exc:
                # The coordinator holds fewer bytes than the resume point (it restarted with a
                # shorter partial file, say): the whole bundle again, not a failed hop.
                if exc.code() != grpc.StatusCode.OUT_OF_RANGE or header.offset == 0:
                    raise
                logger.warning("the coordinator cannot resume the hand back at byte %d (%s); "
                               "sending the bundle again from byte 0",
                               header.offset, exc.details())  # fmt: skip
                header.offset = 0
                return send()

        return self._retrying("hand back", call, lease_lost=lease_lost, on_retry=on_retry)

    def _hand_back_whole(
        self,
        stub: pb_grpc.SiteServiceStub,
        header: pb.UploadHeader,
        payload: bytes,
        result: pb.HopResult,
    ) -> pb.HopResultResponse:
        """A small bundle (from `header.offset`) and its result in one unary call: gRPC sends it
        from the calling thread (a request stream is consumed on a thread of its own)."""
        request = pb.HandBackWhole(header=header, bundle=payload[header.offset :], result=result)
        response: pb.HopResultResponse = stub.HandBackHopWhole(request, timeout=600)
        self.metrics.checkpoint_bytes.labels(direction="upload").inc(len(payload) - header.offset)
        return response

    def _upload_then_report(
        self,
        stub: pb_grpc.SiteServiceStub,
        header: pb.UploadHeader,
        payload: bytes,
        result: pb.HopResult,
    ) -> pb.HopResultResponse:
        """The two-call hand back of older coordinators: UploadCheckpoint, then ReportHopResult."""
        if header.offset < len(payload):
            uploaded: pb.UploadResponse
            if isinstance(stub, SiteStub):
                uploaded = stub.UploadCheckpointFramed(upload_frames(header, payload), timeout=600)
            else:
                uploaded = stub.UploadCheckpoint(
                    self._upload_messages(header, payload), timeout=600
                )
            self.metrics.checkpoint_bytes.labels(direction="upload").inc(
                len(payload) - header.offset
            )
            header.offset = len(payload)
            result.output_checkpoint.CopyFrom(uploaded.checkpoint)
        response: pb.HopResultResponse = stub.ReportHopResult(result, timeout=60)
        return response
