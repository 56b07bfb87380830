"""Thin gRPC servicers: check the caller's certificate role, call the engine, map errors."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc
import grpc.aio

from coordinator.engine import RunEngine
from coordinator.errors import (
    CoordinatorError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    StaleLease,
)
from coordinator.ledger import RunRow
from coordinator.plan import PlanError, parse_plan
from protocols.pki import PeerIdentity, PkiError, Role
from protocols.transport import CHUNK_BYTES, peer_identity
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc

__all__ = ["AdminServicer", "SiteServicer", "run_status"]

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
COORDINATOR_VERSION = "0.1.0"

_CODES: list[tuple[type[Exception], grpc.StatusCode]] = [
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (StaleLease, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (PlanError, grpc.StatusCode.INVALID_ARGUMENT),
]


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            logger.warning("refused %s: %s", code.name, exc)
            await context.abort(code, str(exc))
    raise exc


async def _caller(context: grpc.aio.ServicerContext, role: Role) -> PeerIdentity:
    try:
        identity = peer_identity(context)
    except PkiError as exc:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
    if identity.role is not role:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"this call needs a {role.value} certificate; caller is {identity.role.value} "
            f"{identity.name!r}",
        )
    return identity


class SiteServicer(pb_grpc.SiteServiceServicer):
    """The calls site agents make; the site is always the certificate's name."""

    def __init__(self, engine: RunEngine, heartbeat_interval_ms: int) -> None:
        self.engine = engine
        self.heartbeat_interval_ms = heartbeat_interval_ms

    async def Hello(
        self, request: pb.HelloRequest, context: grpc.aio.ServicerContext
    ) -> pb.HelloResponse:
        identity = await _caller(context, Role.SITE)
        if request.protocol_version != PROTOCOL_VERSION:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"site speaks protocol {request.protocol_version}, coordinator {PROTOCOL_VERSION}",
            )
        known = request.last_ledger_hash
        if known and not self.engine.ledger.has_event(known):
            self.engine.ledger.record_event(
                "site.history-mismatch", site=identity.name, payload={"acknowledged": known}
            )
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the ledger no longer holds event {known}, which this site acknowledged: "
                "the coordinator's history was rewritten or restored from an older backup",
            )
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
                }
                for d in request.datasets
            ],
            certificate_serial=format(identity.serial, "x"),
        )
        return pb.HelloResponse(
            site_name=identity.name,
            coordinator_version=COORDINATOR_VERSION,
            protocol_version=PROTOCOL_VERSION,
            max_chunk_bytes=CHUNK_BYTES,
            heartbeat_interval_ms=self.heartbeat_interval_ms,
        )

    async def StreamTasks(
        self, request: pb.TaskStreamRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Task]:
        identity = await _caller(context, Role.SITE)
        session = await self.engine.connect(identity.name)
        try:
            async for task in self.engine.tasks(session):
                yield task
        finally:
            self.engine.disconnect(session)

    async def DownloadCheckpoint(
        self, request: pb.DownloadRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Chunk]:
        identity = await _caller(context, Role.SITE)
        try:
            row = self.engine.checkpoint_for_download(identity.name, request.sha256)
        except CoordinatorError as exc:
            await _abort(context, exc)
        if request.offset > row.size:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, "offset is past the checkpoint end")
        for offset, data in self.engine.store.iter_chunks(row.sha256, request.offset, CHUNK_BYTES):
            yield pb.Chunk(data=data, offset=offset, total_size=row.size)

    async def UploadCheckpoint(
        self,
        request_iterator: AsyncIterator[pb.UploadRequest],
        context: grpc.aio.ServicerContext,
    ) -> pb.UploadResponse:
        identity = await _caller(context, Role.SITE)
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
            bundle = await self.engine.receive_upload(identity.name, first.header, chunks())
        except CoordinatorError as exc:
            await _abort(context, exc)
        return pb.UploadResponse(
            checkpoint=pb.CheckpointRef(sha256=bundle.sha256, size=bundle.size)
        )

    async def ReportHopResult(
        self, request: pb.HopResult, context: grpc.aio.ServicerContext
    ) -> pb.HopResultResponse:
        identity = await _caller(context, Role.SITE)
        try:
            status = await self.engine.report_result(identity.name, request)
        except CoordinatorError as exc:
            await _abort(context, exc)
        return pb.HopResultResponse(hop_status=status, ledger_head=self.engine.ledger.head())

    async def ReportEvaluation(
        self, request: pb.EvaluationResult, context: grpc.aio.ServicerContext
    ) -> pb.EvaluationResultResponse:
        identity = await _caller(context, Role.SITE)
        try:
            status = await self.engine.report_evaluation(identity.name, request)
        except CoordinatorError as exc:
            await _abort(context, exc)
        return pb.EvaluationResultResponse(status=status)

    async def SendHeartbeat(
        self, request: pb.Heartbeat, context: grpc.aio.ServicerContext
    ) -> pb.HeartbeatResponse:
        identity = await _caller(context, Role.SITE)
        try:
            await self.engine.heartbeat(identity.name, request)
        except (StaleLease, NotFound):
            return pb.HeartbeatResponse(cancel=True)
        except CoordinatorError as exc:
            await _abort(context, exc)
        return pb.HeartbeatResponse(cancel=False)


def run_status(engine: RunEngine, run: RunRow) -> pb.RunStatus:
    """The admin view of a run, with live progress of its leased hop."""
    status = pb.RunStatus(
        run_id=run.id,
        name=run.name,
        status=run.status,
        final_sha256=run.final_sha256 or "",
        error=run.error or "",
    )
    if run.status == "completed":
        status.final_adapter_dir = str(engine.final_adapter_dir(run.id).resolve())
    for hop in run.hops:
        entry = pb.HopStatus(
            index=hop.index,
            hop_id=hop.id,
            site=hop.site,
            status=hop.status,
            input_sha256=hop.input_sha256 or "",
            output_sha256=hop.output_sha256 or "",
            train_started_at_ns=hop.train_started_at_ns or 0,
            train_finished_at_ns=hop.train_finished_at_ns or 0,
            error=hop.error or "",
        )
        entry.metrics.update(hop.metrics or {})
        progress = engine.progress(hop.id)
        if progress is not None:
            entry.step, entry.total_steps = progress.step, progress.total_steps
            if progress.phase and hop.status == "leased":
                entry.status = progress.phase
        status.hops.append(entry)
    for row in run.evaluations:
        evaluation = status.evaluations.add(
            evaluation_id=row.id,
            site=row.site,
            split=row.split,
            checkpoint_sha256=row.checkpoint_sha256,
            status=row.status,
            error=row.error or "",
        )
        evaluation.metrics.update(row.metrics or {})
    return status


class AdminServicer(pb_grpc.AdminServiceServicer):
    """Calls made by ML leads and admins through the `baton` CLI (admin certificates only)."""

    def __init__(self, engine: RunEngine) -> None:
        self.engine = engine

    async def StartRun(
        self, request: pb.StartRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartRunResponse:
        identity = await _caller(context, Role.ADMIN)
        try:
            plan = parse_plan(request.plan_json)
            run_id = await self.engine.start_run(plan)
        except (CoordinatorError, PlanError) as exc:
            await _abort(context, exc)
        logger.info("admin %s started run %s", identity.name, run_id)
        return pb.StartRunResponse(run_id=run_id)

    async def GetRun(
        self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunStatus:
        await _caller(context, Role.ADMIN)
        try:
            run = self.engine.ledger.run(request.run_id)
        except KeyError:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no run {request.run_id!r}")
        return run_status(self.engine, run)

    async def EvaluateRun(
        self, request: pb.EvaluateRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.EvaluateRunResponse:
        identity = await _caller(context, Role.ADMIN)
        try:
            ids = await self.engine.evaluate_run(
                request.run_id, request.split or "validation", list(request.sites)
            )
        except CoordinatorError as exc:
            await _abort(context, exc)
        logger.info("admin %s asked for %s evaluation of run %s", identity.name,
                    request.split, request.run_id)  # fmt: skip
        return pb.EvaluateRunResponse(evaluation_ids=ids)

    async def ResumeRun(
        self, request: pb.RunControlRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunStatus:
        identity = await _caller(context, Role.ADMIN)
        try:
            await self.engine.resume_run(request.run_id)
        except CoordinatorError as exc:
            await _abort(context, exc)
        logger.info("admin %s resumed run %s", identity.name, request.run_id)
        return run_status(self.engine, self.engine.ledger.run(request.run_id))

    async def AbortRun(
        self, request: pb.RunControlRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunStatus:
        identity = await _caller(context, Role.ADMIN)
        reason = request.reason or f"aborted by admin {identity.name}"
        try:
            await self.engine.abort_run(request.run_id, reason)
        except CoordinatorError as exc:
            await _abort(context, exc)
        logger.info("admin %s aborted run %s", identity.name, request.run_id)
        return run_status(self.engine, self.engine.ledger.run(request.run_id))

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListRunsResponse:
        await _caller(context, Role.ADMIN)
        return pb.ListRunsResponse(
            runs=[run_status(self.engine, run) for run in self.engine.ledger.runs()]
        )

    async def ListSites(
        self, request: pb.ListSitesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSitesResponse:
        await _caller(context, Role.ADMIN)
        connected = self.engine.connected_sites()
        response = pb.ListSitesResponse()
        for row in self.engine.ledger.sites():
            site = response.sites.add(
                name=row.name,
                connected=row.name in connected,
                agent_version=row.agent_version,
                capabilities=row.capabilities,
            )
            for model in row.base_models:
                site.base_models.add(name=model["name"], sha256=model["sha256"])
            for dataset in row.datasets:
                site.datasets.add(**dataset)
        return response
