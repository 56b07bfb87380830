"""The run engine: leases hops to connected sites, accepts their uploads and commits results.

All state transitions run on the coordinator's event loop under one lock, each as one ledger
transaction with one event. Tasks are pushed onto a site's open stream the moment they are ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, get_args

from coordinator.engine.spool import UploadSpool
from coordinator.errors import (
    InvalidInput,
    NotFound,
    PermissionDenied,
    PreflightFailed,
    StaleLease,
    StorageFault,
)
from coordinator.ledger import (
    LIVE_HOP_STATES,
    CheckpointRow,
    EvaluationRow,
    HopRow,
    Ledger,
    RunRow,
    StatisticsAnswerRow,
    StatisticsRequestRow,
    TransitionRefused,
)
from coordinator.metrics import CoordinatorMetrics
from coordinator.plan import FailurePolicy, RunPlan, TaskType
from coordinator.preflight import SiteApprovals, SiteView, offline_text, preflight_problems
from coordinator.statistics import (
    CombinedStatistics,
    SiteAggregates,
    StatisticsMismatch,
    combine,
)
from coordinator.storage_faults import StorageHealth, storage_fault_reason
from coordinator.store import CheckpointStore, fsync_write
from protocols.approval import ApprovalBundle
from protocols.checkpoint import (
    Bundle,
    CheckpointError,
    hash_prefix,
    inspect_bundle,
    inspect_bundle_file,
)
from protocols.ledger_head import SignedHead
from protocols.logs import bind_log_context
from protocols.signing import SignatureError, verify_custody
from protocols.v1 import baton_pb2 as pb

__all__ = ["HopProgress", "RunEngine", "SiteSession"]

logger = logging.getLogger(__name__)

WAIT_LOG_SECONDS = 60.0  # "run waits for site" is logged at most this often per hop


@dataclass
class SiteSession:
    """One open task stream of a connected site."""

    site: str
    serial: int = 0  # the certificate the stream was opened with
    queue: asyncio.Queue[pb.Task | None] = field(default_factory=asyncio.Queue)

    def close(self) -> None:
        self.queue.put_nowait(None)


@dataclass
class HopProgress:
    phase: str = ""
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0


def _lora(plan: dict[str, object]) -> pb.LoraConfig:
    lora = plan["lora"]
    assert isinstance(lora, dict)
    return pb.LoraConfig(
        r=lora["r"],
        alpha=lora["alpha"],
        dropout=lora["dropout"],
        target_modules=lora["target_modules"],
    )


def _hop_task(run: RunRow, hop: HopRow, input_ref: CheckpointRow | None) -> pb.Task:
    plan = run.plan
    task = pb.HopTask(
        run_id=run.id,
        hop_id=hop.id,
        hop_index=hop.index,
        lease_token=hop.lease_token or "",
        task_type=plan["task"],
        dataset=plan["dataset"],
        labels=plan["labels"],
        base_model_sha256=run.base_model_sha256 or "",
        lora=_lora(plan),
        hyperparameters=pb.Hyperparameters(**hop.hyperparameters),
        task_options_json=json.dumps(plan.get("options", {}), sort_keys=True),
        approval_bundle_json=approval_bundle(run).canonical_json(),
    )
    if input_ref is not None:
        task.input_checkpoint.CopyFrom(_checkpoint_ref(input_ref))
    cross_validation = _cross_validation(run)
    if cross_validation is not None:
        task.cross_validation.CopyFrom(cross_validation)
    return pb.Task(hop=task)


def _cross_validation(run: RunRow) -> pb.CrossValidation | None:
    spec = run.plan.get("cross_validation")
    if not spec:
        return None
    assert isinstance(spec, dict)
    return pb.CrossValidation(
        folds=int(spec["folds"]), min_validation_rows=int(spec["min_validation_rows"])
    )


def _tensor_specs(bundle: Bundle) -> list[list[object]]:
    """JSON form of a bundle's tensor specs, as the ledger stores them (sorted by name)."""
    return [[t.name, t.dtype, list(t.shape)] for t in bundle.tensors]


def _evaluation_task(run: RunRow, row: EvaluationRow, checkpoint: CheckpointRow) -> pb.Task:
    plan = run.plan
    task = pb.Task(
        evaluation=pb.EvaluationTask(
            evaluation_id=row.id,
            lease_token=row.lease_token or "",
            run_id=run.id,
            checkpoint=_checkpoint_ref(checkpoint),
            task_type=plan["task"],
            dataset=plan["dataset"],
            labels=plan["labels"],
            base_model_sha256=run.base_model_sha256 or "",
            lora=_lora(plan),
            task_options_json=json.dumps(plan.get("options", {}), sort_keys=True),
            split=row.split,
            approval_bundle_json=approval_bundle(run).canonical_json(),
        )
    )
    cross_validation = _cross_validation(run)
    if cross_validation is not None:
        task.evaluation.cross_validation.CopyFrom(cross_validation)
    return task


# Failures that the same site would hit again on a retry: the policy's `then` applies at once.
DETERMINISTIC_FAILURES = frozenset(
    {"not-approved", "base-model-mismatch", "dataset-invalid", "unsupported-task", "no-base-model",
     "bad-task"}
)  # fmt: skip


def _checkpoint_ref(row: CheckpointRow) -> pb.CheckpointRef:
    """Where a site finds a checkpoint, with what it needs to verify who produced it."""
    return pb.CheckpointRef(
        sha256=row.sha256,
        size=row.size,
        signature=bytes.fromhex(row.signature),
        producer_certificate=row.producer_certificate.encode("ascii"),
    )


def approval_bundle(run: RunRow) -> ApprovalBundle:
    """The bundle the run's sites approve, rebuilt from the plan stored with the run."""
    return RunPlan.model_validate(run.plan).approval_bundle()


def _policy(run: RunRow) -> FailurePolicy:
    return FailurePolicy.model_validate(run.plan.get("failure", {}))


def _current_hop(run: RunRow) -> HopRow | None:
    """The first hop not yet settled (committed or skipped), or None when all are."""
    return next((h for h in run.hops if h.status not in ("committed", "skipped")), None)


def _input_sha(run: RunRow, hop: HopRow) -> str | None:
    """A hop trains from the last committed output before it (skipped hops pass it through)."""
    for previous in reversed(run.hops[: hop.index]):
        if previous.status == "committed":
            return previous.output_sha256
    return None


def _finite_metrics(metrics: dict[str, float]) -> dict[str, float]:
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        raise InvalidInput(f"metrics must be finite; not finite: {', '.join(bad)}")
    return metrics


def _actor(by: str | None) -> dict[str, str]:
    """The acting account for an event's payload (nothing when the caller names none)."""
    return {"by": by} if by else {}


def statistics_bundle(request: StatisticsRequestRow) -> ApprovalBundle:
    """The bundle a statistics request's sites approve, rebuilt from the stored request."""
    return ApprovalBundle.for_statistics(
        request.task_type,
        request.dataset,
        min_count=request.min_count,
        noise_std=request.noise_std,
    )


def _statistics_task(request: StatisticsRequestRow, answer: StatisticsAnswerRow) -> pb.Task:
    return pb.Task(
        statistics=pb.StatisticsTask(
            statistics_id=request.id,
            lease_token=answer.lease_token or "",
            task_type=request.task_type,
            dataset=request.dataset,
            min_count=request.min_count,
            noise_std=request.noise_std,
            approval_bundle_json=statistics_bundle(request).canonical_json(),
            expires_at=_unix_seconds(_statistics_expiry(request)),
        )
    )


def _statistics_expiry(request: StatisticsRequestRow) -> datetime | None:
    """When a pending request fails (aware UTC; SQLite returns naive datetimes), or None."""
    expires_at = request.expires_at
    if expires_at is not None and expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)
    return expires_at


def _unix_seconds(moment: datetime | None) -> int:
    return math.ceil(moment.timestamp()) if moment is not None else 0


def _statistics_key(request_id: str, site: str) -> str:
    """Key of a site's statistics task among the engine's sent tasks (hop ids are bare)."""
    return f"statistics:{request_id}:{site}"


_TASK_TYPES: tuple[str, ...] = get_args(TaskType)
_MAX_MIN_COUNT = 1_000_000_000  # StatisticsTask.min_count is a uint32
_MAX_STATISTICS_EXPIRY_SECONDS = 30 * 86400


def _released_aggregates(
    request: StatisticsRequestRow, site: str, result: pb.StatisticsResult
) -> SiteAggregates:
    """A site's reported aggregates, checked before anything is stored."""
    try:
        released = SiteAggregates(
            site=site,
            count=result.count,
            feature_names=tuple(result.feature_names),
            feature_sums=tuple(result.feature_sums),
            feature_sums_of_squares=tuple(result.feature_sums_of_squares),
            label_counts=dict(result.label_counts),
            length_bin_edges=tuple(result.length_bin_edges),
            length_histogram=tuple(result.length_histogram),
            length_unit=result.length_unit,
        )
    except StatisticsMismatch as exc:
        raise InvalidInput(str(exc)) from exc
    if request.task_type == "tabular" and not released.feature_names:
        raise InvalidInput("tabular statistics must name their features")
    if request.noise_std == 0 and released.count < request.min_count:
        raise InvalidInput(
            f"site {site} released aggregates over {released.count:g} rows, fewer than the "
            f"request's minimum of {request.min_count}"
        )
    if request.noise_std == 0:
        # Sites suppress or merge small cells; one that does not (an old agent) is refused.
        small = [f"label {label!r}" for label, n in released.label_counts.items()
                 if n < request.min_count] + [
            f"length bin from {edge}"
            for edge, n in zip(released.length_bin_edges, released.length_histogram, strict=True)
            if n < request.min_count
        ]  # fmt: skip
        if small:
            raise InvalidInput(
                f"site {site} released cells below the request's minimum of "
                f"{request.min_count}: {', '.join(small)}"
            )
    return released


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _absorb(fh: BinaryIO, hasher: Any, chunk: bytes) -> None:
    """Appends an upload chunk to its spool file and to the running hash."""
    fh.write(chunk)
    fh.flush()  # what UploadStatus reports is on disk, not in a buffer
    hasher.update(chunk)


class RunEngine:
    """Drives sequential runs over the sites that are connected."""

    def __init__(
        self,
        ledger: Ledger,
        store: CheckpointStore,
        runs_dir: Path,
        *,
        ca_pem: bytes,
        max_checkpoint_bytes: int,
        statistics_min_count: int = 10,
        statistics_expiry_seconds: float = 3600.0,
    ) -> None:
        self.ledger = ledger
        self.statistics_min_count = statistics_min_count  # for requests that name no minimum
        self.statistics_expiry_seconds = statistics_expiry_seconds  # for requests naming none
        self.ca_pem = ca_pem
        self.store = store
        self.runs_dir = runs_dir
        self.uploads_dir = runs_dir.parent / "uploads"
        self.spool = UploadSpool(self.uploads_dir)
        self.storage = StorageHealth(ledger, runs_dir.parent)
        self.max_checkpoint_bytes = max_checkpoint_bytes
        self._sessions: dict[str, SiteSession] = {}
        self._sent: dict[str, SiteSession] = {}  # hop/evaluation id -> session its task went to
        self._progress: dict[str, HopProgress] = {}
        self._deadlines: dict[str, float] = {}  # hop id -> monotonic lease deadline
        self._not_before: dict[str, float] = {}  # hop id -> retry backoff end
        self._waiting_since: dict[str, float] = {}  # hop id -> when it began waiting for its site
        self._revoked: dict[str, str] | None = None  # serial hex -> reason, cached
        self._signed_head: SignedHead | None = None  # the newest, sent to every site stream
        self._lock = asyncio.Lock()
        self.metrics = CoordinatorMetrics()
        self.metrics.track_connected_sites(lambda: len(self._sessions))
        self._approvals: dict[str, SiteApprovals] = {}  # site -> what it approved (last hello)
        self._offline_since: dict[str, datetime] = {}  # site -> when its task stream closed
        self._wait_logged: dict[str, float] = {}  # hop id -> when "waits for site" was logged

    # ---- certificates -------------------------------------------------------------------------

    def revocation(self, serial: int) -> str | None:
        """The reason a certificate serial was revoked, or None."""
        if self._revoked is None:
            self._revoked = self.ledger.revocations()
        return self._revoked.get(format(serial, "x"))

    async def revoke(self, serial: str, reason: str, *, by: str) -> int:
        """Revokes a certificate serial (hex) and closes the streams opened with it."""
        try:
            number = int(serial, 16)
        except ValueError:
            raise InvalidInput(f"not a hexadecimal certificate serial: {serial!r}") from None
        self.ledger.revoke(format(number, "x"), reason=reason, by=by)
        self._revoked = None
        closed = 0
        for session in list(self._sessions.values()):
            if session.serial == number:
                session.close()
                self.disconnect(session)
                closed += 1
        logger.warning("certificate %x revoked by %s (%s); %d stream(s) closed",
                       number, by, reason, closed)  # fmt: skip
        return closed

    # ---- connections --------------------------------------------------------------------------

    def connected_sites(self) -> set[str]:
        return set(self._sessions)

    async def connect(self, site: str, serial: int = 0) -> SiteSession:
        """Registers a site's new task stream (replacing an older one) and sends it its work."""
        session = SiteSession(site, serial)
        old = self._sessions.get(site)
        if old is not None:
            old.close()
        self._sessions[site] = session
        logger.info("site %s connected its task stream", site)
        if self._signed_head is not None:
            session.queue.put_nowait(pb.Task(ledger_head=self._signed_head.to_proto()))
        await self.dispatch_all()
        return session

    def disconnect(self, session: SiteSession) -> None:
        if self._sessions.get(session.site) is session:
            del self._sessions[session.site]
            self._offline_since[session.site] = datetime.now(UTC)
            logger.info("site %s task stream closed", session.site)

    def publish_head(self, head: SignedHead) -> None:
        """Hands a newly signed ledger head to every connected site (they keep the newest)."""
        self._signed_head = head
        for session in self._sessions.values():
            session.queue.put_nowait(pb.Task(ledger_head=head.to_proto()))

    # ---- preflight ----------------------------------------------------------------------------

    def report_approvals(self, site: str, approvals: SiteApprovals) -> None:
        """Remembers what a site said at hello it approved (for preflight)."""
        self._approvals[site] = approvals

    def site_views(self) -> dict[str, SiteView]:
        """Every registered site as this coordinator knows it: connection, data, approvals."""
        views = {}
        for row in self.ledger.sites():
            dropped = self._offline_since.get(row.name)
            views[row.name] = SiteView(
                name=row.name,
                connected=row.name in self._sessions,
                offline_since=dropped or row.last_seen_at,
                offline_since_exact=dropped is not None,
                base_models=row.base_models,
                datasets=row.datasets,
                approvals=self._approvals.get(row.name),
            )
        return views

    def preflight(self, plan: RunPlan, *, allow_offline: bool = False) -> None:
        """Refuses a run its sites would not run, listing every problem (one per line).

        Raises:
            PreflightFailed: One problem per line of its message.
        """
        problems = preflight_problems(plan, self.site_views(), allow_offline=allow_offline)
        if problems:
            raise PreflightFailed("\n".join(problems))

    def waiting_reason(self, run: RunRow, hop: HopRow) -> str:
        """Why a run's next hop is not running ("waiting for riverside: offline since ...")."""
        current = _current_hop(run)
        if run.status != "running" or current is None or current.id != hop.id:
            return ""
        if hop.status != "pending" or hop.site in self._sessions:
            return ""
        view = self.site_views().get(hop.site)
        return f"waiting for {hop.site}: {offline_text(view) if view else 'never connected'}"

    async def tasks(self, session: SiteSession) -> AsyncIterator[pb.Task]:
        while (task := await session.queue.get()) is not None:
            yield task

    # ---- runs ---------------------------------------------------------------------------------

    async def start_run(self, plan: RunPlan, *, by: str | None = None) -> str:
        """Records a new run and leases its first hop if the site is connected.

        Args:
            plan: The run plan.
            by: Who started it (a dashboard account), recorded in the `run.created` event.
        """
        known = {s.name for s in self.ledger.sites()}
        unknown = sorted({site for site, _ in plan.expanded_hops()} - known)
        if unknown:
            raise InvalidInput(
                f"run plan names site(s) that never registered: {', '.join(unknown)}; "
                f"known sites: {', '.join(sorted(known)) or 'none'}"
            )
        run_id = uuid.uuid4().hex
        hops = [
            HopRow(
                id=uuid.uuid4().hex,
                index=index,
                site=site,
                hyperparameters=hp.model_dump(),
                status="pending",
                metrics={},
            )
            for index, (site, hp) in enumerate(plan.expanded_hops())
        ]
        self.ledger.create_run(
            run_id, plan.name, json.loads(plan.to_json()), hops, plan.base_model_sha256, by=by
        )
        logger.info("run %s (%s) created with %d hops", run_id, plan.name, len(hops))
        await self.dispatch(run_id)
        return run_id

    async def dispatch_all(self) -> None:
        for run in self.ledger.active_runs():
            await self.dispatch(run.id)
        await self.dispatch_evaluations()
        await self.dispatch_statistics()

    async def dispatch(self, run_id: str) -> None:
        """Leases the run's next hop to its site, or re-sends a leased task after a reconnect."""
        async with self._lock:
            await self._dispatch_locked(run_id)

    async def _dispatch_locked(self, run_id: str) -> None:
        run = self.ledger.run(run_id)
        if run.status != "running":
            return
        hop = _current_hop(run)
        if hop is None:
            await self._finish(run)
            return
        if hop.status == "pending" and time.monotonic() < self._not_before.get(hop.id, 0.0):
            return  # retry backoff: the watchdog dispatches it when due
        session = self._sessions.get(hop.site)
        if session is None:
            self._waiting_since.setdefault(hop.id, time.monotonic())
            now = time.monotonic()
            # Every connect and watchdog tick dispatches: say it once per hop per minute.
            if now - self._wait_logged.get(hop.id, -math.inf) >= WAIT_LOG_SECONDS:
                self._wait_logged[hop.id] = now
                logger.info("run %s waits for site %s to connect", run_id, hop.site)
            return
        self._waiting_since.pop(hop.id, None)
        self._wait_logged.pop(hop.id, None)
        if hop.status in LIVE_HOP_STATES and self._sent.get(hop.id) is session:
            return
        input_sha = _input_sha(run, hop)
        if self._refuse_tampered(run, input_sha):
            return
        if hop.status == "pending":
            hop = self.ledger.lease_hop(hop.id, secrets.token_hex(16), input_sha)
            self.metrics.hop_phase(hop.id, "leased")
        self._deadlines[hop.id] = time.monotonic() + _policy(run).lease_timeout_seconds
        input_ref = self.ledger.checkpoint(input_sha) if input_sha else None
        self._sent[hop.id] = session
        self._progress[hop.id] = HopProgress(phase="leased")
        session.queue.put_nowait(_hop_task(run, hop, input_ref))

    def progress(self, hop_id: str) -> HopProgress | None:
        return self._progress.get(hop_id)

    # ---- site calls ---------------------------------------------------------------------------

    def _leased_hop(self, site: str, hop_id: str, lease_token: str) -> tuple[RunRow, HopRow]:
        run, hop = self._find_hop(hop_id)
        if hop.site != site:
            raise PermissionDenied(f"hop {hop_id} is not leased to site {site}")
        if hop.status not in LIVE_HOP_STATES or not lease_token or hop.lease_token != lease_token:
            raise StaleLease(f"lease token for hop {hop_id} is not current")
        if run.status != "running":
            raise StaleLease(f"run {run.id} is {run.status}")
        return run, hop

    def _find_hop(self, hop_id: str) -> tuple[RunRow, HopRow]:
        """The hop and its run, by id: one lookup, not a scan of every active run."""
        found = self.ledger.hop(hop_id)
        if found is None:
            raise NotFound(f"no active hop {hop_id}")
        run = self.ledger.run(found.run_id)
        if run.status != "running":
            raise NotFound(f"no active hop {hop_id}")
        return run, next(h for h in run.hops if h.id == hop_id)

    def checkpoint_for_download(self, site: str, sha256: str) -> CheckpointRow:
        """A site may download only the input of its leased hop or of its pending evaluation."""
        needed = self.ledger.live_hop_needs(site, sha256) or self.ledger.pending_evaluation_needs(
            site, sha256
        )
        if not needed:
            raise PermissionDenied(f"site {site} holds no lease that needs checkpoint {sha256}")
        row = self.ledger.checkpoint(sha256)
        if row is None:
            raise NotFound(f"checkpoint {sha256} is not in the store")
        return row

    async def receive_upload(
        self,
        site: str,
        certificate_pem: bytes,
        header: pb.UploadHeader,
        chunks: AsyncIterator[bytes],
    ) -> Bundle:
        """Accepts a hop's output bundle: size, hash, signature, format, values and lineage."""
        run, hop = self._leased_hop(site, header.hop_id, header.lease_token)
        if header.total_size > self.max_checkpoint_bytes:
            raise InvalidInput(
                f"checkpoint of {header.total_size} bytes exceeds the "
                f"{self.max_checkpoint_bytes}-byte cap"
            )
        held = [row.sha256 for row in self.ledger.stored_checkpoints(hop.id)]
        if held and header.sha256 not in held:
            raise InvalidInput(
                f"hop {hop.id} already holds uploaded output {held[0]} under this lease; "
                "report it, or let the lease lapse, instead of uploading another"
            )
        where = f"upload for hop {hop.index} of run {run.id}"
        with self.spool.writing(hop.id), self.storage.guard(where):
            partial = self.spool.claim(hop.id, header.lease_token, header.sha256)
            resumable = False
            try:
                received, digest = await self._spool_chunks(partial, header, chunks)
                if received != header.total_size:
                    await asyncio.to_thread(_fsync_file, partial)
                    resumable = True
                    raise InvalidInput(
                        f"upload ended after {received} of {header.total_size} declared bytes; "
                        f"resume from byte {received}"
                    )
                # The hop may have ended while the bytes arrived (lease expired, run aborted).
                run, hop = self._leased_hop(site, header.hop_id, header.lease_token)
                # Checked from the file (bounded reads, off the event loop) while it is made
                # durable; then the spool file itself becomes the stored bundle: the bytes are
                # written once.
                _, inspected = await asyncio.gather(
                    asyncio.to_thread(_fsync_file, partial),
                    asyncio.to_thread(self._inspected_upload, partial, header.sha256, digest),
                )
                bundle = self._checked_upload(run, hop, site, certificate_pem, header, inspected)
                await asyncio.to_thread(self.store.adopt, partial, bundle.sha256)
            except asyncio.CancelledError:
                raise  # a cut stream: kept to resume under the same lease (until the hop ends)
            except BaseException:
                if not resumable:
                    self.spool.discard(hop.id)  # rejected, or storage failed: nothing kept
                raise
            self.spool.discard(hop.id)
            self.ledger.record_checkpoint(
                CheckpointRow(
                    sha256=bundle.sha256,
                    size=bundle.size,
                    run_id=run.id,
                    hop_id=hop.id,
                    producer_site=site,
                    parent_sha256=hop.input_sha256,
                    manifest=json.loads(bundle.manifest.to_json()),
                    tensors=_tensor_specs(bundle),
                    signature=header.signature.hex(),
                    producer_certificate=certificate_pem.decode("ascii"),
                    stored_at=datetime.now(UTC),
                )
            )
            async with self._lock:
                with contextlib.suppress(TransitionRefused):
                    self.ledger.transition_hop(
                        hop.id,
                        expected=("leased", "training"),
                        status="uploaded",
                        event="hop.uploaded",
                        payload={"output_sha256": bundle.sha256},
                    )
                self.metrics.hop_phase(hop.id, "committing")
                self._extend(run, hop.id)
        return bundle

    async def _spool_chunks(
        self, partial: Path, header: pb.UploadHeader, chunks: AsyncIterator[bytes]
    ) -> tuple[int, str]:
        """Writes chunks to the partial file as they arrive (a cut upload resumes from there).

        Returns the bytes received and the sha256 of the whole file, hashed while it streamed
        (a resumed upload's earlier bytes are hashed from the file first).
        """
        received = partial.stat().st_size if partial.is_file() else 0
        if header.offset > received:
            raise InvalidInput(
                f"cannot resume at byte {header.offset}: {received} bytes were received"
            )
        with partial.open("r+b" if partial.is_file() else "wb") as fh:
            fh.truncate(header.offset)
            hasher = await asyncio.to_thread(hash_prefix, partial, header.offset)
            fh.seek(header.offset)
            received = header.offset
            # Each chunk is written and hashed on a worker thread while the next one arrives.
            loop = asyncio.get_running_loop()
            pending: asyncio.Future[None] | None = None
            try:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > header.total_size:
                        raise InvalidInput("upload is longer than its header declared")
                    if pending is not None:
                        await pending
                    pending = loop.run_in_executor(None, _absorb, fh, hasher, chunk)
                if pending is not None:
                    await pending
            finally:
                if pending is not None and not pending.done():
                    await asyncio.wait([pending])  # the file stays open until its last write
        self.metrics.checkpoint_bytes.labels(direction="upload").inc(received - header.offset)
        return received, hasher.hexdigest()

    def _inspected_upload(self, partial: Path, expected_sha256: str, digest: str) -> Bundle:
        """The spooled bundle's size, hash, format and values, checked from the file."""
        try:
            return inspect_bundle_file(
                partial,
                expected_sha256=expected_sha256,
                max_bytes=self.max_checkpoint_bytes,
                sha256=digest,
            )
        except CheckpointError as exc:
            raise InvalidInput(str(exc)) from exc

    def _checked_upload(
        self,
        run: RunRow,
        hop: HopRow,
        site: str,
        certificate_pem: bytes,
        header: pb.UploadHeader,
        bundle: Bundle,
    ) -> Bundle:
        """The inspected bundle once its lineage and its producer's signature hold."""
        self._check_lineage(run, hop, site, bundle)
        try:
            verify_custody(
                bundle.sha256, header.signature, certificate_pem, ca_pem=self.ca_pem, producer=site
            )
        except SignatureError as exc:
            raise InvalidInput(f"checkpoint-integrity: {exc}") from exc
        return bundle

    def upload_progress(self, site: str, header: pb.UploadHeader) -> int:
        """Bytes of a hop's upload already received (to resume a cut upload from there)."""
        self._leased_hop(site, header.hop_id, header.lease_token)
        return self.spool.received(header.hop_id, header.lease_token, header.sha256)

    def _hop_ended(self, hop_id: str, reason: str) -> None:
        """Frees what a hop that ended (or is redone) leaves: its spool files, its other uploads.

        Best effort under a storage fault: the watchdog's sweep and `baton store gc` finish it.
        """
        try:
            self.spool.discard(hop_id)
            for row in self.ledger.supersede_checkpoints(hop_id, reason):
                self.store.delete(row.sha256)
        except Exception as exc:
            fault = storage_fault_reason(exc)
            if fault is None:
                raise
            self.storage.report(f"clean-up of hop {hop_id}", fault)

    def _check_lineage(self, run: RunRow, hop: HopRow, site: str, bundle: Bundle) -> None:
        manifest = bundle.manifest
        expected = {
            "run_id": run.id,
            "hop_id": hop.id,
            "producer_site": site,
            "parent_sha256": hop.input_sha256 or "",
            "task_type": run.plan["task"],
        }
        for key, value in expected.items():
            if getattr(manifest, key) != value:
                raise InvalidInput(
                    f"checkpoint manifest {key} is {getattr(manifest, key)!r}, expected {value!r}"
                )
        if run.base_model_sha256 and manifest.base_model_sha256 != run.base_model_sha256:
            raise InvalidInput(
                f"checkpoint was trained on base model {manifest.base_model_sha256}, "
                f"the run is pinned to {run.base_model_sha256}"
            )
        parent = self.ledger.checkpoint(hop.input_sha256) if hop.input_sha256 else None
        if parent is not None and sorted(parent.tensors) != _tensor_specs(bundle):
            raise InvalidInput(
                "checkpoint tensors (names, dtypes, shapes) differ from the hop's input"
            )

    async def report_result(self, site: str, result: pb.HopResult) -> str:
        """Commits or fails a hop, then moves the run on. Returns the hop's new status.

        A retried report of a hop already committed with the same output is answered
        "committed" again (the site may not have seen the first answer); nothing is written.
        """
        async with self._lock:
            done = self.ledger.hop(result.hop_id)
            if (
                done is not None
                and done.site == site
                and done.status == "committed"
                and result.ok
                and done.output_sha256 == result.output_checkpoint.sha256
            ):
                return "committed"
            run, hop = self._leased_hop(site, result.hop_id, result.lease_token)
            bind_log_context(run_id=run.id, hop_id=hop.id, site=site)
            if result.released:
                return await self._hop_released(run, hop, result.error_message)
            if not result.ok:
                code = result.error_code or "site-error"
                with self.storage.guard(f"failure report of hop {hop.index} of run {run.id}"):
                    status = await self._hop_failed(
                        run, hop, code, result.error_message or "the site reported a failure"
                    )
                return status
            metrics = _finite_metrics(dict(result.metrics))
            output = self.ledger.checkpoint(result.output_checkpoint.sha256)
            if output is None or output.hop_id != hop.id or output.status != "stored":
                raise InvalidInput(
                    f"output checkpoint {result.output_checkpoint.sha256} was not uploaded "
                    f"for hop {hop.id}"
                )
            try:
                with self.storage.guard(f"commit of hop {hop.index} of run {run.id}"):
                    self.ledger.commit_hop(
                        hop.id,
                        lease_token=result.lease_token,
                        output_sha256=output.sha256,
                        metrics=metrics,
                        train_started_at_ns=result.train_started_at_ns,
                        train_finished_at_ns=result.train_finished_at_ns,
                        base_model_sha256=output.manifest["base_model_sha256"],
                    )
            except TransitionRefused as exc:
                raise StaleLease(str(exc)) from exc
            self._forget(hop.id)
            self._observe_commit(run, hop, result)
            logger.info("run %s hop %d committed (%s)", run.id, hop.index, site)
            self._hop_ended(hop.id, "hop committed with another output")
            try:
                with self.storage.guard(f"dispatch after hop {hop.index} of run {run.id}"):
                    await self._dispatch_locked(run.id)
            except StorageFault:
                pass  # committed; the watchdog leases the next hop once storage recovers
        return "committed"

    def _observe_commit(self, run: RunRow, hop: HopRow, result: pb.HopResult) -> None:
        self.metrics.hop_settled("committed")
        previous = next((h for h in run.hops if h.index == hop.index - 1), None)
        if (
            previous is not None
            and previous.status == "committed"
            and previous.train_finished_at_ns
            and result.train_started_at_ns >= previous.train_finished_at_ns
        ):
            handoff = result.train_started_at_ns - previous.train_finished_at_ns
            self.metrics.handoff.observe(handoff / 1e9)

    async def _finish(self, run: RunRow) -> None:
        """Completes a run whose hops are all settled: final = last committed output."""
        final = next((h for h in reversed(run.hops) if h.status == "committed"), None)
        if final is None or final.output_sha256 is None:
            self.ledger.transition_run(
                run.id, expected=("running",), status="failed", error="no hop was committed"
            )
            return
        if self._refuse_tampered(run, final.output_sha256):
            return
        try:
            with self.storage.guard(f"export of run {run.id}'s final adapter"):
                await asyncio.to_thread(self._export_final, run.id, final.output_sha256)
                self.ledger.transition_run(
                    run.id,
                    expected=("running",),
                    status="completed",
                    payload={"final_sha256": final.output_sha256},
                    final_sha256=final.output_sha256,
                )
        except StorageFault:
            return  # still running: the watchdog retries the export once storage recovers
        logger.info("run %s completed", run.id)

    def _refuse_tampered(self, run: RunRow, checkpoint_sha: str | None) -> bool:
        """Pauses the run (ledgered) if its rows or the checkpoint differ from their events."""
        mismatches = self.ledger.run_mismatches(run, checkpoint_sha)
        if not mismatches:
            return False
        logger.error("run %s paused: %s", run.id, mismatches[0].message)
        with contextlib.suppress(TransitionRefused):
            self.ledger.pause_for_mismatch(run.id, mismatches)
        return True

    async def _hop_failed(self, run: RunRow, hop: HopRow, code: str, message: str) -> str:
        """Applies the run's failure policy to a hop that failed, expired or waited too long."""
        policy = _policy(run)
        self._forget(hop.id)
        action = policy.on_failure
        if action == "retry":
            retryable = code not in DETERMINISTIC_FAILURES and hop.attempts <= policy.max_retries
            action = "retry" if retryable else policy.then
        detail = {"code": code, "message": message, "action": action}
        self.metrics.hop_settled({"retry": "retried", "skip": "skipped"}.get(action, "failed"))
        logger.warning("run %s hop %d at %s: %s (%s) -> %s", run.id, hop.index, hop.site,
                       code, message, action,
                       extra={"run_id": run.id, "hop_id": hop.id, "site": hop.site})  # fmt: skip
        live = (*LIVE_HOP_STATES, "pending")
        if action == "retry":
            delay = policy.retry_backoff_seconds * 2 ** max(hop.attempts - 1, 0)
            self.ledger.transition_hop(
                hop.id, expected=live, status="pending", event="hop.retry", payload=detail,
                lease_token=None, error_code=code, error=message,
            )  # fmt: skip
            self._hop_ended(hop.id, f"hop retried after {code}")
            self._not_before[hop.id] = time.monotonic() + delay
            return "pending"
        if action == "skip":
            self.ledger.transition_hop(
                hop.id, expected=live, status="skipped", event="hop.skipped", payload=detail,
                lease_token=None, error_code=code, error=message,
            )  # fmt: skip
            self._hop_ended(hop.id, f"hop skipped after {code}")
            await self._dispatch_locked(run.id)
            return "skipped"
        self.ledger.transition_hop(
            hop.id, expected=live, status="failed", event="hop.failed", payload=detail,
            lease_token=None, error_code=code, error=message,
        )  # fmt: skip
        self._hop_ended(hop.id, f"hop failed with {code}")
        error = f"hop {hop.index} at {hop.site}: {code}: {message}"
        if action == "pause":
            self.ledger.transition_run(run.id, expected=("running",), status="paused",
                                       payload=detail, error=error)  # fmt: skip
            return "failed"
        self.ledger.transition_run(run.id, expected=("running",), status="failed",
                                   payload=detail, error=error)  # fmt: skip
        return "failed"

    async def _hop_released(self, run: RunRow, hop: HopRow, reason: str) -> str:
        """A site handed its hop back unfinished: pending again, and not a failed attempt."""
        self._forget(hop.id)
        self.ledger.transition_hop(
            hop.id, expected=LIVE_HOP_STATES, status="pending", event="hop.released",
            payload={"reason": reason[:500] or "released by the site"}, lease_token=None,
            attempts=lambda row: max(row.attempts - 1, 0),
        )  # fmt: skip
        self.metrics.hop_settled("released")
        logger.info("run %s hop %d released by %s: %s", run.id, hop.index, hop.site, reason)
        await self._dispatch_locked(run.id)
        return "pending"

    async def resume_run(self, run_id: str, *, by: str | None = None) -> None:
        """Resumes a paused run: its failed hop is tried again."""
        async with self._lock:
            try:
                run = self.ledger.run(run_id)
            except KeyError:
                raise NotFound(f"no run {run_id!r}") from None
            if run.status != "paused":
                raise InvalidInput(f"run {run_id} is {run.status}, not paused")
            hop = next((h for h in run.hops if h.status == "failed"), None)
            if hop is not None:
                self.ledger.transition_hop(
                    hop.id,
                    expected=("failed",),
                    status="pending",
                    event="hop.retry",
                    payload={"action": "resume", **_actor(by)},
                )
            self.ledger.transition_run(
                run_id, expected=("paused",), status="running", payload=_actor(by), error=None
            )
            await self._dispatch_locked(run_id)

    async def abort_run(self, run_id: str, reason: str, *, by: str | None = None) -> None:
        async with self._lock:
            try:
                self.ledger.transition_run(
                    run_id, expected=("running", "paused"), status="aborted",
                    payload={"reason": reason, **_actor(by)}, error=reason,
                )  # fmt: skip
            except KeyError:
                raise NotFound(f"no run {run_id!r}") from None
            except TransitionRefused as exc:
                raise InvalidInput(str(exc)) from exc
            for hop in self.ledger.run(run_id).hops:
                if hop.status in LIVE_HOP_STATES:
                    self._forget(hop.id)
                    self._hop_ended(hop.id, "run aborted")

    async def pause_run(self, run_id: str, *, by: str | None = None) -> None:
        """Pauses a running run; the hop in flight is called back and redone on resume.

        Its lease is withdrawn, so the site's late upload or result is refused as stale.
        """
        async with self._lock:
            try:
                run = self.ledger.run(run_id)
            except KeyError:
                raise NotFound(f"no run {run_id!r}") from None
            if run.status != "running":
                raise InvalidInput(f"run {run_id} is {run.status}, not running")
            hop = _current_hop(run)
            if hop is not None and hop.status in LIVE_HOP_STATES:
                self._forget(hop.id)
                self.ledger.transition_hop(
                    hop.id, expected=LIVE_HOP_STATES, status="pending", event="hop.recalled",
                    payload={"action": "pause", **_actor(by)}, lease_token=None,
                )  # fmt: skip
                self._hop_ended(hop.id, "run paused")
            self.ledger.transition_run(
                run_id, expected=("running",), status="paused",
                payload={"reason": "paused by an operator", **_actor(by)},
                error=None,
            )  # fmt: skip

    async def skip_failed_hop(self, run_id: str, *, by: str | None = None) -> None:
        """Skips the failed hop of a paused run and resumes the run from the next hop."""
        async with self._lock:
            try:
                run = self.ledger.run(run_id)
            except KeyError:
                raise NotFound(f"no run {run_id!r}") from None
            hop = next((h for h in run.hops if h.status == "failed"), None)
            if run.status != "paused" or hop is None:
                raise InvalidInput(f"run {run_id} is {run.status} with no failed hop to skip")
            self.ledger.transition_hop(
                hop.id, expected=("failed",), status="skipped", event="hop.skipped",
                payload={"action": "skip", **_actor(by)},
            )  # fmt: skip
            self.ledger.transition_run(
                run_id, expected=("paused",), status="running", payload=_actor(by), error=None
            )
            await self._dispatch_locked(run_id)

    # ---- watchdog -----------------------------------------------------------------------------

    async def watch(self, interval: float = 0.5) -> None:
        """Expires leases, gives up on absent sites and releases retry backoffs, forever."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check_deadlines()
            except Exception as exc:
                fault = storage_fault_reason(exc)
                if fault is None:
                    logger.exception("watchdog pass failed; trying again")
                else:
                    self.storage.report("watchdog pass", fault)

    def _sweep_spool(self, runs: list[RunRow]) -> None:
        """Removes spool files whose hop no longer holds that lease (ended, expired, crashed)."""
        live = {
            hop.id: hop.lease_token
            for run in runs
            for hop in run.hops
            if hop.status in LIVE_HOP_STATES and hop.lease_token
        }
        freed = self.spool.sweep(live)
        if freed:
            logger.info("removed %d bytes of abandoned partial uploads", freed)

    async def check_deadlines(self) -> None:
        self.storage.check()
        now = time.monotonic()
        runs = self.ledger.active_runs()
        self._sweep_spool(runs)
        for run in runs:
            hop = _current_hop(run)
            if hop is None:
                await self.dispatch(run.id)  # all hops settled: retries a failed export
                continue
            policy = _policy(run)
            async with self._lock:
                if hop.status in LIVE_HOP_STATES:
                    deadline = self._deadlines.setdefault(
                        hop.id, now + policy.lease_timeout_seconds
                    )
                    if now > deadline:
                        message = "no heartbeat before the lease deadline"
                        self.metrics.lease_expiries.inc()
                        await self._hop_failed(run, hop, "lease-expired", message)
                        continue
                waiting = self._waiting_since.get(hop.id)
                if (
                    hop.status == "pending"
                    and waiting is not None
                    and hop.site not in self._sessions
                    and now - waiting > policy.site_wait_seconds
                ):
                    self._waiting_since.pop(hop.id, None)
                    await self._hop_failed(run, hop, "site-unavailable",
                                           f"site {hop.site} stayed offline")  # fmt: skip
                    continue
            if hop.status == "pending":
                await self.dispatch(run.id)
        await self.expire_statistics()

    def _extend(self, run: RunRow, hop_id: str) -> None:
        self._deadlines[hop_id] = time.monotonic() + _policy(run).lease_timeout_seconds

    # ---- evaluations --------------------------------------------------------------------------

    async def evaluate_run(
        self, run_id: str, split: str, sites: list[str], *, by: str | None = None
    ) -> list[str]:
        """Asks sites to evaluate a completed run's final checkpoint on their own data."""
        try:
            run = self.ledger.run(run_id)
        except KeyError:
            raise NotFound(f"no run {run_id!r}") from None
        if split not in ("validation", "test"):
            raise InvalidInput(f"split must be 'validation' or 'test', not {split!r}")
        if run.status != "completed" or not run.final_sha256:
            raise InvalidInput(
                f"run {run_id} is {run.status}: only a completed run's final checkpoint "
                "is evaluated (test splits are for final reports only)"
            )
        if split == "test" and run.plan.get("cross_validation"):
            raise InvalidInput(
                f"run {run_id} is a cross-validation run: its checkpoint holds fold models, "
                "scored on validation only; test splits are for a final run's report"
            )
        run_sites = list(dict.fromkeys(hop.site for hop in run.hops))
        chosen = list(dict.fromkeys(sites)) or run_sites
        # Sites outside the run may score it too (cross-site probes): they see only the
        # checkpoint, under the run's bundle, which they must have approved like any other.
        known = {row.name for row in self.ledger.sites()}
        unknown = sorted(set(chosen) - known - set(run_sites))
        if unknown:
            raise InvalidInput(f"no site named {', '.join(unknown)} has ever connected")
        now = datetime.now(UTC)
        rows = [
            EvaluationRow(
                id=uuid.uuid4().hex,
                run_id=run_id,
                checkpoint_sha256=run.final_sha256,
                site=site,
                split=split,
                status="pending",
                lease_token=secrets.token_hex(16),
                metrics={},
                created_at=now,
            )
            for site in chosen
        ]
        self.ledger.create_evaluations(rows, by=by)
        await self.dispatch_evaluations()
        return [row.id for row in rows]

    async def dispatch_evaluations(self) -> None:
        async with self._lock:
            for row in self.ledger.pending_evaluations():
                session = self._sessions.get(row.site)
                if session is None or self._sent.get(row.id) is session:
                    continue
                checkpoint = self.ledger.checkpoint(row.checkpoint_sha256)
                if checkpoint is None:
                    continue
                self._sent[row.id] = session
                session.queue.put_nowait(
                    _evaluation_task(self.ledger.run(row.run_id), row, checkpoint)
                )

    async def report_evaluation(self, site: str, result: pb.EvaluationResult) -> str:
        async with self._lock:
            row = self.ledger.evaluation(result.evaluation_id)
            if row is None:
                raise NotFound(f"no evaluation {result.evaluation_id}")
            if row.site != site:
                raise PermissionDenied(f"evaluation {row.id} is not assigned to site {site}")
            if row.status != "pending" or row.lease_token != result.lease_token:
                raise StaleLease(f"evaluation {row.id} is not pending under that lease token")
            with self.storage.guard(f"evaluation {row.id}"):
                if result.ok:
                    metrics = _finite_metrics(dict(result.metrics))
                    self.ledger.finish_evaluation(row.id, metrics=metrics)
                else:
                    message = f"{result.error_code or 'site-error'}: {result.error_message}"
                    self.ledger.finish_evaluation(row.id, metrics={}, error=message)
            self._sent.pop(row.id, None)
            return "failed" if not result.ok else "done"

    # ---- aggregate statistics -----------------------------------------------------------------

    async def collect_statistics(
        self,
        dataset: str,
        task_type: str,
        sites: list[str],
        *,
        min_count: int = 0,
        noise_std: float = 0.0,
        expires_in_seconds: float = 0.0,
    ) -> str:
        """Asks sites for aggregate statistics of a dataset's training rows; returns the id.

        Args:
            dataset: The dataset name every site registered.
            task_type: The dataset's task type.
            sites: The sites to ask (at least one; each must have connected once).
            min_count: No aggregate over fewer rows may leave a site; 0: the coordinator's
                default (``statistics_min_count``). Sites may enforce a higher floor.
            noise_std: > 0: sites add Gaussian noise of this std to every aggregate.
            expires_in_seconds: The request fails if not every site answered by then; 0: the
                coordinator's default (``statistics_expiry_seconds``).
        """
        if not dataset or len(dataset) > 200:
            raise InvalidInput("a statistics request needs a dataset name (at most 200 characters)")
        if task_type not in _TASK_TYPES:
            raise InvalidInput(
                f"task type must be one of {', '.join(_TASK_TYPES)}, not {task_type!r}"
            )
        chosen = list(dict.fromkeys(sites))
        if not chosen:
            raise InvalidInput("a statistics request must name at least one site")
        known = {row.name for row in self.ledger.sites()}
        unknown = sorted(set(chosen) - known)
        if unknown:
            raise InvalidInput(f"no site named {', '.join(unknown)} has ever connected")
        min_count = min_count or self.statistics_min_count
        if not 1 <= min_count <= _MAX_MIN_COUNT:
            raise InvalidInput(f"min_count must be in [1, {_MAX_MIN_COUNT}], got {min_count}")
        if not (math.isfinite(noise_std) and noise_std >= 0):
            raise InvalidInput(f"noise_std must be finite and >= 0, got {noise_std}")
        expires_in = expires_in_seconds or self.statistics_expiry_seconds
        if not (math.isfinite(expires_in) and 1 <= expires_in <= _MAX_STATISTICS_EXPIRY_SECONDS):
            raise InvalidInput(
                f"a statistics request expires in 1 s to {_MAX_STATISTICS_EXPIRY_SECONDS} s, "
                f"not {expires_in:g} s"
            )
        created_at = datetime.now(UTC)
        request = StatisticsRequestRow(
            id=uuid.uuid4().hex,
            dataset=dataset,
            task_type=task_type,
            min_count=min_count,
            noise_std=float(noise_std),
            sites=chosen,
            status="pending",
            combined={},
            created_at=created_at,
            expires_at=created_at + timedelta(seconds=expires_in),
        )
        answers = [
            StatisticsAnswerRow(
                site=site, status="pending", lease_token=secrets.token_hex(16), aggregates={}
            )
            for site in chosen
        ]
        self.ledger.create_statistics(
            request, answers, approval_bundle_sha256=statistics_bundle(request).sha256
        )
        logger.info("statistics %s of %s requested from %s (min count %d, noise std %g)",
                    request.id, dataset, ", ".join(chosen), min_count, noise_std)  # fmt: skip
        await self.dispatch_statistics()
        return request.id

    async def dispatch_statistics(self) -> None:
        """Sends each pending statistics task to its site if connected (again after a reconnect).

        A request whose answers are all in but which is still pending (the coordinator stopped
        between recording the last answer and settling) is settled here.
        """
        await self.expire_statistics()
        async with self._lock:
            for request in self.ledger.statistics_requests("pending"):
                if all(answer.status != "pending" for answer in request.answers):
                    self._settle_statistics(request)
                    continue
                for answer in request.answers:
                    session = self._sessions.get(answer.site)
                    key = _statistics_key(request.id, answer.site)
                    if answer.status != "pending" or session is None:
                        continue
                    if self._sent.get(key) is session:
                        continue
                    self._sent[key] = session
                    session.queue.put_nowait(_statistics_task(request, answer))

    async def report_statistics(self, site: str, result: pb.StatisticsResult) -> str:
        """Records one site's aggregates or refusal; settles the request when it can.

        A request fails as soon as one site refuses (answers already in are kept, and answers
        from sites already at work are still recorded); it is done, with the pooled statistics,
        once every site has answered with aggregates.

        Returns:
            The site's answer status: "done" or "failed".
        """
        async with self._lock:
            request = self.ledger.statistics_request(result.statistics_id)
            if request is None:
                raise NotFound(f"no statistics request {result.statistics_id}")
            answer = next((a for a in request.answers if a.site == site), None)
            if answer is None:
                raise PermissionDenied(f"statistics {request.id} is not assigned to site {site}")
            if (
                answer.status != "pending"
                or not result.lease_token
                or answer.lease_token != result.lease_token
            ):
                raise StaleLease(f"statistics {request.id} of site {site} is not pending "
                                 "under that lease token")  # fmt: skip
            expires_at = _statistics_expiry(request)
            if expires_at is not None and datetime.now(UTC) > expires_at:
                self._expire_statistics(request, expires_at)
                raise StaleLease(
                    f"statistics {request.id} expired at "
                    f"{expires_at.isoformat(timespec='seconds')}; the answer of site {site} "
                    "came too late"
                )
            try:
                if result.ok:
                    released = _released_aggregates(request, site, result)
                    self.ledger.finish_statistics_answer(
                        request.id, site, lease_token=result.lease_token,
                        aggregates=released.to_json(),
                    )  # fmt: skip
                else:
                    self.ledger.finish_statistics_answer(
                        request.id, site, lease_token=result.lease_token, aggregates=None,
                        error_code=result.error_code or "site-error",
                        error=result.error_message or "the site reported a failure",
                    )  # fmt: skip
            except TransitionRefused as exc:
                raise StaleLease(str(exc)) from exc
            self._sent.pop(_statistics_key(request.id, site), None)
            refreshed = self.ledger.statistics_request(request.id)
            assert refreshed is not None
            if refreshed.status == "pending":
                self._settle_statistics(refreshed)
            logger.info("statistics %s: site %s answered (%s)", request.id, site,
                        "ok" if result.ok else result.error_code)  # fmt: skip
            return "done" if result.ok else "failed"

    def _settle_statistics(self, request: StatisticsRequestRow) -> None:
        """Fails a pending request once a site refused; combines once every site answered."""
        failed = [a for a in request.answers if a.status == "failed"]
        try:
            if failed:
                error = "; ".join(f"{a.site}: {a.error_code}: {a.error}" for a in failed)
                self.ledger.settle_statistics(request.id, status="failed", error=error)
                logger.warning("statistics %s failed: %s", request.id, error)
                return
            if any(a.status == "pending" for a in request.answers):
                return
            try:
                combined = combine(
                    [SiteAggregates.from_json(a.aggregates) for a in request.answers]
                )
            except StatisticsMismatch as exc:
                self.ledger.settle_statistics(request.id, status="failed", error=str(exc))
                logger.warning("statistics %s failed: %s", request.id, exc)
                return
            self.ledger.settle_statistics(request.id, status="done", combined=combined.to_json())
            logger.info("statistics %s done over %g rows", request.id, combined.count)
        except TransitionRefused:
            pass  # settled already

    async def expire_statistics(self) -> None:
        """Fails every pending statistics request past its expiry (``statistics.expired``)."""
        now = datetime.now(UTC)
        async with self._lock:
            for request in self.ledger.statistics_requests("pending"):
                expires_at = _statistics_expiry(request)
                if expires_at is not None and now > expires_at:
                    self._expire_statistics(request, expires_at)

    def _expire_statistics(self, request: StatisticsRequestRow, expires_at: datetime) -> None:
        waiting = [a.site for a in request.answers if a.status == "pending"]
        error = (
            f"expired at {expires_at.isoformat(timespec='seconds')} before "
            f"{', '.join(waiting) or 'every site'} answered"
        )
        try:
            self.ledger.settle_statistics(
                request.id, status="failed", error=error, event="statistics.expired"
            )
        except TransitionRefused:
            return  # settled already
        for site in waiting:
            self._sent.pop(_statistics_key(request.id, site), None)
        logger.warning("statistics %s %s", request.id, error)

    def statistics_status(self, request_id: str) -> pb.StatisticsStatus:
        """The admin view of a statistics request, with the pooled result once done."""
        request = self.ledger.statistics_request(request_id)
        if request is None:
            raise NotFound(f"no statistics request {request_id!r}")
        status = pb.StatisticsStatus(
            statistics_id=request.id,
            status=request.status,
            dataset=request.dataset,
            task_type=request.task_type,
            min_count=request.min_count,
            noise_std=request.noise_std,
            approval_bundle_sha256=statistics_bundle(request).sha256,
            error=request.error or "",
            expires_at=_unix_seconds(_statistics_expiry(request)),
        )
        for answer in request.answers:
            status.sites.add(
                site=answer.site,
                status=answer.status,
                count=float(answer.aggregates.get("count", 0.0)),
                error=f"{answer.error_code}: {answer.error}" if answer.status == "failed" else "",
            )
        if request.status == "done":
            combined = CombinedStatistics.from_json(request.combined)
            status.count = combined.count
            status.feature_names.extend(combined.feature_names)
            status.mean.extend(combined.mean)
            status.std.extend(combined.std)
            status.label_counts.update(combined.label_counts)
            status.length_bin_edges.extend(combined.length_bin_edges)
            status.length_histogram.extend(combined.length_histogram)
            status.length_unit = combined.length_unit
        return status

    async def heartbeat(self, site: str, beat: pb.Heartbeat) -> None:
        """Extends the lease; the first "training" beat moves the hop to training."""
        async with self._lock:
            run, hop = self._leased_hop(site, beat.hop_id, beat.lease_token)
            self._extend(run, hop.id)
            self.metrics.hop_phase(hop.id, beat.phase)
            self._progress[beat.hop_id] = HopProgress(
                phase=beat.phase, step=beat.step, total_steps=beat.total_steps, loss=beat.loss
            )
            if beat.phase == "training" and hop.status == "leased":
                with self.storage.guard(f"heartbeat of hop {hop.index} of run {run.id}"):
                    self.ledger.transition_hop(
                        hop.id, expected=("leased",), status="training", event="hop.training"
                    )

    async def quiesce(self) -> None:
        """Returns once no state transition is in progress (the one in flight has committed)."""
        async with self._lock:
            pass

    def _forget(self, hop_id: str) -> None:
        self.metrics.hop_phase(hop_id, None)
        for table in (self._sent, self._progress, self._deadlines, self._not_before):
            table.pop(hop_id, None)

    def final_adapter_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id / "final_adapter"

    def _export_final(self, run_id: str, sha256: str) -> None:
        """Writes the final adapter as a PEFT directory (adapter_model.safetensors + config)."""
        data = self.store.read(sha256)
        bundle = inspect_bundle(data, expected_sha256=sha256)
        out = self.final_adapter_dir(run_id)
        fsync_write(out / "adapter_model.safetensors", data)
        fsync_write(
            out / "adapter_config.json", json.dumps(bundle.adapter_config, indent=2).encode()
        )
        fsync_write(out / "baton_manifest.json", bundle.manifest.to_json().encode())
