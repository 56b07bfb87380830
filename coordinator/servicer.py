"""Thin gRPC servicers: check the caller's certificate role, call the engine, map errors."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import grpc
import grpc.aio
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from coordinator.approval_reports import approval_rule, report_approvals
from coordinator.engine import RunEngine
from coordinator.errors import (
    CoordinatorError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    PreflightFailed,
    ResumePointLost,
    StaleLease,
    StorageFault,
    UploadBusy,
)
from coordinator.heap import TransferTrim
from coordinator.ledger import CheckpointRow, Ledger, RunRow
from coordinator.metrics import CoordinatorMetrics
from coordinator.plan import PlanError, parse_plan
from coordinator.preflight import SiteApprovals
from protocols.chunk_wire import download_chunk
from protocols.logs import bind_log_context
from protocols.pki import PeerIdentity, PkiError, Role, identity_from_pem, sign_csr
from protocols.transport import CHUNK_BYTES, peer_certificate, peer_identity
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from protocols.version import BATON_VERSION, PROTOCOL_VERSION

__all__ = [
    "AdminServicer",
    "DataChunk",
    "FramedChunk",
    "MalformedMessageGuard",
    "SiteServicer",
    "run_status",
]

logger = logging.getLogger(__name__)

EXPIRY_WARNING_DAYS = 30
COORDINATOR_VERSION = BATON_VERSION

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (PreflightFailed, grpc.StatusCode.FAILED_PRECONDITION),
    (StaleLease, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (PlanError, grpc.StatusCode.INVALID_ARGUMENT),
    (UploadBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ResumePointLost, grpc.StatusCode.OUT_OF_RANGE),
]


_CALL: ContextVar[tuple[str, PeerIdentity | None]] = ContextVar("_CALL", default=("", None))
# Serial and subject of the caller's certificate, set before its role and name are checked.
_CERTIFICATE: ContextVar[tuple[str, str] | None] = ContextVar("_CERTIFICATE", default=None)


def _certificate_fields(certificate: tuple[str, str] | None) -> dict[str, str | None]:
    serial, subject = certificate or (None, None)
    return {"serial": serial, "subject": subject}


class _Guarded:
    """Identity checks and refusals shared by both services; every refusal reaches the ledger."""

    engine: RunEngine

    def _record_refusal(self, code: grpc.StatusCode, reason: str) -> None:
        method, identity = _CALL.get()
        logger.warning("refused %s %s: %s", method, code.name, reason)
        self.engine.metrics.refusal(code.name)
        self.engine.ledger.record_event(
            "access.refused",
            site=identity.name if identity and identity.role is Role.SITE else None,
            payload={
                "method": method,
                "code": code.name,
                "reason": reason,
                "role": identity.role.value if identity else None,
                "name": identity.name if identity else None,
                **_certificate_fields(_CERTIFICATE.get()),
            },
        )

    def _ledger_head(self) -> str:
        """The newest event hash this coordinator committed (held in memory: no query per
        answer), or the ledger's head read from SQL before its first commit."""
        ledger = self.engine.ledger
        return ledger.known_head() or ledger.head()

    async def _refuse(self, context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
        if isinstance(exc, StorageFault):
            # Not a refusal of the caller, and the ledger may be what is full: the site retries.
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        for kind, code in _CODES:
            if isinstance(exc, kind):
                self._record_refusal(code, str(exc))
                await context.abort(code, str(exc))
        raise exc

    async def _deny(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, reason: str
    ) -> NoReturn:
        self._record_refusal(code, reason)
        await context.abort(code, reason)
        raise AssertionError("unreachable")  # context.abort always raises

    async def _caller(
        self, context: grpc.aio.ServicerContext, role: Role, method: str
    ) -> PeerIdentity:
        _CALL.set((method, None))
        _CERTIFICATE.set(peer_certificate(context))
        try:
            identity = peer_identity(context)
        except PkiError as exc:
            await self._deny(context, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        _CALL.set((method, identity))
        if identity.role is Role.SITE:
            bind_log_context(site=identity.name)
        revoked = self.engine.revocation(identity.serial)
        if revoked is not None:
            await self._deny(
                context,
                grpc.StatusCode.UNAUTHENTICATED,
                f"certificate {identity.serial:x} of {identity.name!r} was revoked: {revoked}",
            )
        if identity.role is not role:
            await self._deny(
                context,
                grpc.StatusCode.PERMISSION_DENIED,
                f"this call needs a {role.value} certificate; caller is {identity.role.value} "
                f"{identity.name!r}",
            )
        return identity


class _Malformed:
    """Stands in for a request that did not parse, so the handler can refuse it cleanly."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _nul_field(message: Any, prefix: str = "") -> str | None:
    """The first text field holding a NUL character (no id, name or digest has one; PostgreSQL
    cannot even compare such a string), or None."""
    for descriptor in message.DESCRIPTOR.fields:
        # Bytes may hold NUL and are never read here: reading a field copies it (a whole
        # upload chunk per message).
        if descriptor.type == FieldDescriptor.TYPE_BYTES:
            continue
        singular_message = descriptor.message_type is not None and not descriptor.is_repeated
        if singular_message and not message.HasField(descriptor.name):
            continue
        value = getattr(message, descriptor.name)
        name = f"{prefix}{descriptor.name}"
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            items = [(k, v) for k, v in value.items()]
            if any(isinstance(k, str) and "\x00" in k for k, _ in items):
                return name
            values = [v for _, v in items]
        else:
            values = list(value) if descriptor.is_repeated else [value]
        for item in values:
            if isinstance(item, str) and "\x00" in item:
                return name
            if hasattr(item, "ListFields") and (found := _nul_field(item, f"{name}.")):
                return found
    return None


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            message = deserializer(data) if deserializer else data
        except DecodeError as exc:
            return _Malformed(exc)
        if hasattr(message, "ListFields") and (field := _nul_field(message)):
            return _Malformed(ValueError(f"text field {field} holds a NUL character"))
        return message

    return parse


# The two calls that stream a bundle: every message but the first and last is one chunk,
# `bytes data = 2` of the `part` oneof and nothing else (tag 0x12, then its length).
_CHUNK_STREAMS = frozenset(
    {"/baton.v1.SiteService/UploadCheckpoint", "/baton.v1.SiteService/HandBackHop"}
)
_DATA_TAG = 0x12


class DataChunk:
    """A chunk message (`data` set, no other field) taken without copying its bytes: `data` is
    a view into the message gRPC received. Reads as the parsed message does: `WhichOneof("part")`
    and `data` (a full parse copies the chunk into the message, then again on each `data` read)."""

    __slots__ = ("data",)

    def __init__(self, data: memoryview) -> None:
        self.data = data

    @staticmethod
    def WhichOneof(group: str) -> str | None:  # the protobuf message's name
        return "data" if group == "part" else None


def _data_chunk(message: bytes) -> DataChunk | None:
    """The chunk `message` holds when it is a data chunk alone; None for anything else (the
    header, the result, other encodings of a chunk: those get the full parse)."""
    if len(message) < 2 or message[0] != _DATA_TAG:
        return None
    length = shift = 0
    position = 1
    while position < min(len(message), 11):  # a varint length takes at most 10 bytes
        byte = message[position]
        position += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            break
        shift += 7
    else:
        return None
    if position + length != len(message):
        return None
    return DataChunk(memoryview(message)[position:])


# The two calls that stream a stored bundle out: their handlers yield `FramedChunk`s.
_FRAMED_DOWNLOADS = frozenset(
    {"/baton.v1.SiteService/DownloadCheckpoint", "/baton.v1.AdminService/DownloadFinalCheckpoint"}
)


class FramedChunk:
    """A download's `Chunk` message already serialized (`protocols.chunk_wire.download_chunk`,
    framed on the store's reading thread): sent as it is, no message built per chunk."""

    __slots__ = ("wire",)

    def __init__(self, wire: bytes) -> None:
        self.wire = wire


def _framed_first(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
    """`serializer` with `FramedChunk`s passed through as their bytes."""

    def serialize(message: Any) -> bytes:
        if isinstance(message, FramedChunk):
            return message.wire
        return serializer(message) if serializer else message  # type: ignore[no-any-return]

    return serialize


async def _download_frames(
    engine: RunEngine, row: CheckpointRow, offset: int
) -> AsyncGenerator[FramedChunk, None]:
    """A stored bundle's `Chunk` messages from `offset`, framed as they are read."""
    total_size = row.size

    def frame(data: bytes, at: int) -> bytes:
        return download_chunk(data, at, total_size)

    frames = engine.store.read_framed(row.sha256, offset, CHUNK_BYTES, frame)
    async with aclosing(frames):  # a cut download closes its file at once
        async for _, length, wire in frames:
            yield FramedChunk(wire)
            engine.metrics.checkpoint_bytes.labels(direction="download").inc(length)


def _chunks_first(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    """`deserializer` with data chunks taken as views (`DataChunk`), not parsed."""

    def parse(data: bytes) -> Any:
        chunk = _data_chunk(data)
        if chunk is not None:
            return chunk
        return deserializer(data) if deserializer else data

    return parse


class MalformedMessageGuard(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Turns undecodable messages into INVALID_ARGUMENT (recorded), instead of gRPC's UNKNOWN;
    takes bundle chunks in as views (`DataChunk`), sends downloads' `FramedChunk`s as they are."""

    def __init__(
        self,
        ledger: Ledger,
        metrics: CoordinatorMetrics | None = None,
        transfers: TransferTrim | None = None,
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.transfers = transfers  # told when bundle transfers start and end

    def _refuse_reason(
        self, method: str, malformed: _Malformed, context: grpc.aio.ServicerContext
    ) -> str:
        reason = f"malformed {method.rsplit('/', 1)[-1]} message: {malformed.error}"
        if self.metrics is not None:
            self.metrics.refusal("INVALID_ARGUMENT")
        certificate = peer_certificate(context)
        try:
            identity: PeerIdentity | None = peer_identity(context)
        except PkiError:
            identity = None
        self.ledger.record_event(
            "access.refused",
            site=identity.name if identity and identity.role is Role.SITE else None,
            payload={
                "method": method,
                "code": "INVALID_ARGUMENT",
                "reason": reason,
                "role": identity.role.value if identity else None,
                "name": identity.name if identity else None,
                **_certificate_fields(certificate),
            },
        )
        return reason

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        guard = self
        bulk = method in _CHUNK_STREAMS or method in _FRAMED_DOWNLOADS
        transfers = self.transfers if bulk else None  # bundle transfers only
        if handler.unary_unary is not None or handler.unary_stream is not None:
            inner = handler.unary_unary or handler.unary_stream

            if handler.unary_unary is not None:

                async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    if isinstance(request, _Malformed):
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            guard._refuse_reason(method, request, context),
                        )
                    return await inner(request, context)

                return grpc.unary_unary_rpc_method_handler(
                    unary,
                    request_deserializer=_safe(handler.request_deserializer),
                    response_serializer=handler.response_serializer,
                )

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Malformed):
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        guard._refuse_reason(method, request, context),
                    )
                if transfers is None:
                    async for item in inner(request, context):
                        yield item
                    return
                moved = 0
                transfers.started()
                try:
                    async for item in inner(request, context):
                        moved += len(item.wire) if isinstance(item, FramedChunk) else 0
                        yield item
                finally:
                    transfers.ended(moved)

            serializer = handler.response_serializer
            if method in _FRAMED_DOWNLOADS:
                serializer = _framed_first(serializer)
            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=_safe(handler.request_deserializer),
                response_serializer=serializer,
            )
        if handler.stream_unary is not None:
            inner_stream = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                moved = 0

                async def checked() -> AsyncIterator[Any]:
                    nonlocal moved
                    async for request in requests:
                        if isinstance(request, _Malformed):
                            await context.abort(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                guard._refuse_reason(method, request, context),
                            )
                        if isinstance(request, DataChunk):
                            moved += len(request.data)
                        yield request

                if transfers is None:
                    return await inner_stream(checked(), context)
                transfers.started()
                try:
                    return await inner_stream(checked(), context)
                finally:
                    transfers.ended(moved)

            deserializer = handler.request_deserializer
            if method in _CHUNK_STREAMS:
                deserializer = _chunks_first(deserializer)
            return grpc.stream_unary_rpc_method_handler(
                stream_unary,
                request_deserializer=_safe(deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


class SiteServicer(_Guarded, pb_grpc.SiteServiceServicer):
    """The calls site agents make; the site is always the certificate's name."""

    def __init__(
        self, engine: RunEngine, heartbeat_interval_ms: int, ca_dir: Path | None = None
    ) -> None:
        self.engine = engine
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.ca_dir = ca_dir

    async def RenewCertificate(
        self, request: pb.RenewRequest, context: grpc.aio.ServicerContext
    ) -> pb.RenewResponse:
        identity = await self._caller(context, Role.SITE, "RenewCertificate")
        if self.ca_dir is None:
            await self._deny(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                "online renewal is not enabled on this coordinator; renew offline: "
                "`baton-site cert csr`, then the CA holder runs `baton pki sign`",
            )
        try:
            certificate = sign_csr(
                self.ca_dir, request.csr_pem, Role.SITE, expected_name=identity.name
            )
        except PkiError as exc:
            await self._deny(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        renewed = identity_from_pem(certificate)
        self.engine.ledger.record_event(
            "certificate.renewed",
            site=identity.name,
            payload={
                "old_serial": format(identity.serial, "x"),
                "new_serial": format(renewed.serial, "x"),
                "expires": renewed.not_valid_after.isoformat(),
            },
        )
        return pb.RenewResponse(certificate_pem=certificate)

    async def Hello(
        self, request: pb.HelloRequest, context: grpc.aio.ServicerContext
    ) -> pb.HelloResponse:
        identity = await self._caller(context, Role.SITE, "Hello")
        if request.protocol_version != PROTOCOL_VERSION:
            await self._deny(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"site speaks protocol {request.protocol_version}, coordinator {PROTOCOL_VERSION}",
            )
        known = request.last_ledger_hash
        if known and not self.engine.ledger.has_event(known):
            await self._deny(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the ledger no longer holds event {known}, which this site acknowledged: "
                "the coordinator's history was rewritten or restored from an older backup",
            )
        if request.HasField("kept_head"):
            problem = self.engine.ledger.head_problem(request.kept_head.seq, request.kept_head.hash)
            if problem:
                await self._deny(context, grpc.StatusCode.FAILED_PRECONDITION,
                                 f"this site's signed ledger head #{request.kept_head.seq} does "
                                 f"not match the ledger ({problem}): the coordinator's ledger "
                                 "was truncated or rewritten")  # fmt: skip
        self.engine.ledger.register_site(
            identity.name,
            agent_version=request.agent_version,
            capabilities=list(request.capabilities),
            base_models=[{"name": m.name, "sha256": m.sha256} for m in request.base_models],
            datasets=[
                {
                    "name": d.name,
                    "task": d.task,
                    "train_examples": d.train_examples,
                    "validation_examples": d.validation_examples,
                    "test_examples": d.test_examples,
                    "labels": list(d.labels),
                }
                for d in request.datasets
            ],
            certificate_serial=format(identity.serial, "x"),
            certificate_expires_at=identity.not_valid_after,
        )
        self.engine.report_approvals(
            identity.name,
            SiteApprovals(
                bundles=frozenset(request.approved_bundles),
                by_policy=request.approval_by_policy,
                not_required=request.approval_not_required,
                rules=tuple(approval_rule(rule) for rule in request.approval_rules),
            ),
        )
        self.engine.report_provisional(identity.name, request.accepts_provisional_hops)
        self.engine.site_certificate_presented(
            identity.name, context.auth_context()["x509_pem_cert"][0]
        )
        days_left = (identity.not_valid_after - datetime.now(UTC)).days
        if days_left < EXPIRY_WARNING_DAYS:
            logger.warning("certificate of site %s expires in %d days", identity.name, days_left)
        return pb.HelloResponse(
            certificate_expires_at=int(identity.not_valid_after.timestamp()),
            site_name=identity.name,
            coordinator_version=COORDINATOR_VERSION,
            protocol_version=PROTOCOL_VERSION,
            max_chunk_bytes=CHUNK_BYTES,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
        )

    async def StreamTasks(
        self, request: pb.TaskStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Task]:
        identity = await self._caller(context, Role.SITE, "StreamTasks")
        session = await self.engine.connect(identity.name, identity.serial)
        try:
            async for task in self.engine.tasks(session):
                yield task
        finally:
            self.engine.disconnect(session)

    async def DownloadCheckpoint(  # type: ignore[override]  # framed chunks (MalformedMessageGuard)
        self, request: pb.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[FramedChunk]:
        identity = await self._caller(context, Role.SITE, "DownloadCheckpoint")
        try:
            row = self.engine.checkpoint_for_download(identity.name, request.sha256)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        if request.offset > row.size:
            await self._deny(
                context, grpc.StatusCode.OUT_OF_RANGE, "offset is past the checkpoint end"
            )
        async with aclosing(_download_frames(self.engine, row, request.offset)) as frames:
            async for frame in frames:
                yield frame

    async def UploadCheckpoint(
        self,
        request_iterator: AsyncIterator[pb.UploadRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadResponse:
        identity = await self._caller(context, Role.SITE, "UploadCheckpoint")
        messages = aiter(request_iterator)

        async def chunks() -> AsyncIterator[bytes]:
            async for message in messages:
                if message.WhichOneof("part") != "data":
                    raise InvalidInput("only data chunks may follow the upload header")
                yield message.data

        try:
            first = await anext(messages, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidInput("an upload must start with its header")
            certificate = context.auth_context()["x509_pem_cert"][0]
            checkpoint = await self.engine.receive_upload(
                identity.name, certificate, first.header, chunks()
            )
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        return pb.UploadResponse(checkpoint=checkpoint)

    async def HandBackHop(
        self,
        request_iterator: AsyncIterator[pb.HandBackRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.HopResultResponse:
        identity = await self._caller(context, Role.SITE, "HandBackHop")
        messages = aiter(request_iterator)
        try:
            first = await anext(messages, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidInput("a hand back must start with its upload header")
            certificate = context.auth_context()["x509_pem_cert"][0]
            status = await self.engine.hand_back(identity.name, certificate, first.header, messages)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        return pb.HopResultResponse(hop_status=status, ledger_head=self._ledger_head())

    async def HandBackHopWhole(
        self, request: pb.HandBackWhole, context: grpc.aio.ServicerContext
    ) -> pb.HopResultResponse:
        identity = await self._caller(context, Role.SITE, "HandBackHopWhole")
        try:
            certificate = context.auth_context()["x509_pem_cert"][0]
            status = await self.engine.hand_back_whole(identity.name, certificate, request)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        return pb.HopResultResponse(hop_status=status, ledger_head=self._ledger_head())

    async def UploadStatus(
        self, request: pb.UploadHeader, context: grpc.aio.ServicerContext
    ) -> pb.UploadProgress:
        identity = await self._caller(context, Role.SITE, "UploadStatus")
        try:
            received = self.engine.upload_progress(identity.name, request)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        return pb.UploadProgress(received=received)

    async def ReportHopResult(
        self, request: pb.HopResult, context: grpc.aio.ServicerContext
    ) -> pb.HopResultResponse:
        identity = await self._caller(context, Role.SITE, "ReportHopResult")
        try:
            status = await self.engine.report_result(identity.name, request)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        return pb.HopResultResponse(hop_status=status, ledger_head=self._ledger_head())

    async def ReportHopValidation(
        self, request: pb.HopValidation, context: grpc.aio.ServicerContext
    ) -> pb.HopValidationResponse:
        identity = await self._caller(context, Role.SITE, "ReportHopValidation")
        try:
            await self.engine.report_validation(identity.name, request)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        return pb.HopValidationResponse(ledger_head=self._ledger_head())

    async def ReportEvaluation(
        self, request: pb.EvaluationResult, context: grpc.aio.ServicerContext
    ) -> pb.EvaluationResultResponse:
        identity = await self._caller(context, Role.SITE, "ReportEvaluation")
        try:
            status = await self.engine.report_evaluation(identity.name, request)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        return pb.EvaluationResultResponse(status=status)

    async def ReportStatistics(
        self, request: pb.StatisticsResult, context: grpc.aio.ServicerContext
    ) -> pb.StatisticsResultResponse:
        identity = await self._caller(context, Role.SITE, "ReportStatistics")
        try:
            status = await self.engine.report_statistics(identity.name, request)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        return pb.StatisticsResultResponse(status=status)

    async def SendHeartbeat(
        self, request: pb.Heartbeat, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        identity = await self._caller(context, Role.SITE, "SendHeartbeat")
        try:
            await self.engine.heartbeat(identity.name, request)
        except (StaleLease, NotFound):
            return pb.HeartbeatResponse(cancel=True)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        return pb.HeartbeatResponse(cancel=False)

    async def CheckConnection(
        self, request: pb.ConnectionCheckRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConnectionCheck:
        identity = await self._caller(context, Role.SITE, "CheckConnection")
        runs = [
            run
            for run in self.engine.runs.all()
            if any(hop.site == identity.name for hop in run.hops)
        ]
        return pb.ConnectionCheck(
            site_name=identity.name,
            coordinator_time_unix_ns=time.time_ns(),
            certificate_expires_at=int(identity.not_valid_after.timestamp()),
            coordinator_version=COORDINATOR_VERSION,
            protocol_version=PROTOCOL_VERSION,
            pinned_base_models=sorted({r.base_model_sha256 for r in runs if r.base_model_sha256}),
            datasets=sorted({str(r.plan["dataset"]) for r in runs if r.plan.get("dataset")}),
        )


def run_status(engine: RunEngine, run: RunRow) -> pb.RunStatus:
    """The admin view of a run, with live progress of its leased hop (its rounds read from the
    ledger: for callers off the event loop, such as the dashboard's threads)."""
    return engine.views.status(run, engine.ledger.rounds(run.id))


class AdminServicer(_Guarded, pb_grpc.AdminServiceServicer):
    """Calls made by ML leads and admins through the `baton` CLI (admin certificates only)."""

    def __init__(self, engine: RunEngine) -> None:
        self.engine = engine

    async def StartRun(
        self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartRunResponse:
        identity = await self._caller(context, Role.ADMIN, "StartRun")
        try:
            plan = parse_plan(request.plan_json)
            self.engine.preflight(plan, allow_offline=request.allow_offline)
            run_id = await self.engine.start_run(plan)
        except (CoordinatorError, PlanError) as exc:
            await self._refuse(context, exc)
        logger.info("admin %s started run %s", identity.name, run_id)
        return pb.StartRunResponse(run_id=run_id)

    async def GetRun(
        self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunStatus:
        await self._caller(context, Role.ADMIN, "GetRun")
        return await self._run_view(context, request.run_id)

    async def _run_view(self, context: grpc.aio.ServicerContext, run_id: str) -> pb.RunStatus:
        """A run's view: a running run's from memory, another's read off the event loop."""
        try:
            return await self.engine.views.run(run_id)
        except KeyError:
            await self._deny(context, grpc.StatusCode.NOT_FOUND, f"no run {run_id!r}")

    async def EvaluateRun(
        self, request: pb.EvaluateRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.EvaluateRunResponse:
        identity = await self._caller(context, Role.ADMIN, "EvaluateRun")
        try:
            ids = await self.engine.evaluate_run(
                request.run_id, request.split or "validation", list(request.sites)
            )
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        logger.info("admin %s asked for %s evaluation of run %s", identity.name,
                    request.split, request.run_id)  # fmt: skip
        return pb.EvaluateRunResponse(evaluation_ids=ids)

    async def ResumeRun(
        self, request: pb.RunControlRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunStatus:
        identity = await self._caller(context, Role.ADMIN, "ResumeRun")
        try:
            await self.engine.resume_run(request.run_id)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        logger.info("admin %s resumed run %s", identity.name, request.run_id)
        return await self._run_view(context, request.run_id)

    async def AbortRun(
        self, request: pb.RunControlRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunStatus:
        identity = await self._caller(context, Role.ADMIN, "AbortRun")
        reason = request.reason or f"aborted by admin {identity.name}"
        try:
            await self.engine.abort_run(request.run_id, reason)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        logger.info("admin %s aborted run %s", identity.name, request.run_id)
        return await self._run_view(context, request.run_id)

    async def RevokeCertificate(
        self, request: pb.RevokeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RevokeResponse:
        identity = await self._caller(context, Role.ADMIN, "RevokeCertificate")
        try:
            closed = await self.engine.revoke(
                request.serial.lower(), request.reason or "revoked", by=identity.name
            )
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        return pb.RevokeResponse(closed_streams=closed)

    async def CollectStatistics(
        self, request: pb.CollectStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatisticsStatus:
        identity = await self._caller(context, Role.ADMIN, "CollectStatistics")
        try:
            statistics_id = await self.engine.collect_statistics(
                request.dataset,
                request.task_type,
                list(request.sites),
                min_count=request.min_count,
                noise_std=request.noise_std,
                expires_in_seconds=request.expires_in_seconds,
                cv_folds=request.cv_folds,
            )
            status = self.engine.statistics_status(statistics_id)
        except CoordinatorError as exc:
            await self._refuse(context, exc)
        logger.info("admin %s asked for statistics %s of %s", identity.name, statistics_id,
                    request.dataset)  # fmt: skip
        return status

    async def GetStatistics(
        self, request: pb.GetStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.StatisticsStatus:
        await self._caller(context, Role.ADMIN, "GetStatistics")
        try:
            return self.engine.statistics_status(request.statistics_id)
        except CoordinatorError as exc:
            await self._refuse(context, exc)

    async def DownloadFinalCheckpoint(  # type: ignore[override]  # framed (MalformedMessageGuard)
        self, request: pb.DownloadFinalCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[FramedChunk]:
        identity = await self._caller(context, Role.ADMIN, "DownloadFinalCheckpoint")
        try:
            run, row = await self.engine.reader.run(self._final_checkpoint, request.run_id)
        except KeyError:
            await self._deny(context, grpc.StatusCode.NOT_FOUND, f"no run {request.run_id!r}")
        if run.status != "completed" or not run.final_sha256:
            await self._deny(
                context,
                grpc.StatusCode.FAILED_PRECONDITION,
                f"run {run.id} is {run.status}: only a completed run has a final adapter",
            )
        if row is None or request.offset > row.size:
            await self._deny(
                context, grpc.StatusCode.OUT_OF_RANGE, "offset is past the checkpoint end"
            )
        logger.info("admin %s downloads the final adapter of run %s", identity.name, run.id)
        async with aclosing(_download_frames(self.engine, row, request.offset)) as frames:
            async for frame in frames:
                yield frame

    def _final_checkpoint(self, run_id: str) -> tuple[RunRow, CheckpointRow | None]:
        """On the ledger reader's thread: the run and, once completed, its final checkpoint."""
        run = self.engine.ledger.run(run_id, evaluations=False)
        if run.status != "completed" or not run.final_sha256:
            return run, None
        return run, self.engine.ledger.checkpoint(run.final_sha256)

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunsResponse:
        await self._caller(context, Role.ADMIN, "ListRuns")
        return pb.ListRunsResponse(runs=await self.engine.views.all())

    async def ListSites(
        self, request: pb.ListSitesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSitesResponse:
        await self._caller(context, Role.ADMIN, "ListSites")
        connected = self.engine.connected_sites()
        return await self.engine.reader.run(self._sites, connected)

    def _sites(self, connected: set[str]) -> pb.ListSitesResponse:
        """On the ledger reader's thread: every registered site's view."""
        rows = self.engine.ledger.sites()
        views = self.engine.sessions.site_views(rows)
        response = pb.ListSitesResponse()
        for row in rows:
            site = response.sites.add(
                name=row.name,
                connected=row.name in connected,
                agent_version=row.agent_version,
                capabilities=row.capabilities,
                certificate_serial=row.certificate_serial,
                certificate_expires_at=int(row.certificate_expires_at.timestamp())
                if row.certificate_expires_at
                else 0,
            )
            for model in row.base_models:
                site.base_models.add(name=model["name"], sha256=model["sha256"])
            for dataset in row.datasets:
                site.datasets.add(**dataset)
            report_approvals(site.approvals, views.get(row.name))
        return response
