"""The dashboard's one service layer: reads through the ledger, acts through the run engine.

Pages and the JSON API both call these; nothing here writes state except by an engine method.
"""

from __future__ import annotations

import io
import json
import tomllib
import zipfile
from datetime import UTC, datetime, timedelta

from coordinator.dashboard.schemas import (
    ActiveStudy,
    CheckpointView,
    EvaluationView,
    EventPage,
    EventView,
    HopView,
    Overview,
    RoundView,
    RunDetail,
    RunPage,
    RunSummary,
    SiteView,
    VerifyResult,
)
from coordinator.engine import RunEngine
from coordinator.errors import NotFound
from coordinator.ledger import LIVE_HOP_STATES, CheckpointRow, EventRow, RunRow
from coordinator.plan import PlanError, RunPlan, parse_plan
from coordinator.preflight import SiteApprovals
from coordinator.servicer import run_status
from protocols.checkpoint import AGGREGATOR
from protocols.signing import SignatureError, verify_aggregate_custody, verify_custody

__all__ = ["CERTIFICATE_WARNING_DAYS", "DashboardService", "parse_plan_text"]

CERTIFICATE_WARNING_DAYS = 30


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_plan_text(text: str) -> RunPlan:
    """A run plan pasted as JSON or TOML.

    Raises:
        PlanError: Neither valid JSON nor valid TOML, or not a valid plan.
    """
    stripped = text.strip()
    if not stripped:
        raise PlanError("the run plan is empty")
    if stripped.startswith("{"):
        return parse_plan(stripped)
    try:
        return parse_plan(tomllib.loads(stripped))
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"run plan is neither JSON nor valid TOML: {exc}") from exc


def certificate_warning(expires_at: datetime | None, now: datetime) -> str | None:
    if expires_at is None:
        return None
    left = _aware(expires_at) - now
    if left <= timedelta(0):
        return "expired"
    if left <= timedelta(days=CERTIFICATE_WARNING_DAYS):
        return f"expires in {left.days} day(s)"
    return None


def _summary(run: RunRow, counts: dict[str, int]) -> RunSummary:
    return RunSummary(
        run_id=run.id,
        name=run.name,
        status=run.status,
        created_at=_aware(run.created_at),
        finished_at=_aware(run.finished_at) if run.finished_at else None,
        hops_total=sum(counts.values()),
        hops_committed=counts.get("committed", 0),
        error=run.error,
    )


def event_view(row: EventRow) -> EventView:
    return EventView(
        seq=row.seq, at=row.at, kind=row.kind, run_id=row.run_id, hop_id=row.hop_id,
        site=row.site, payload=row.payload, prev_hash=row.prev_hash, hash=row.hash,
    )  # fmt: skip


def event_line(row: EventRow) -> str:
    """One event as the JSONL export writes it (as `baton ledger export` does)."""
    return json.dumps({"seq": row.seq, "at": row.at, "kind": row.kind, "run_id": row.run_id,
                       "hop_id": row.hop_id, "site": row.site, "payload": row.payload,
                       "prev_hash": row.prev_hash, "hash": row.hash}, sort_keys=True)  # fmt: skip


class DashboardService:
    """Read models for the pages and the API, over one run engine and its ledger."""

    def __init__(self, engine: RunEngine) -> None:
        self.engine = engine
        self.ledger = engine.ledger

    # ---- reads ---------------------------------------------------------------------------------

    def sites(self) -> list[SiteView]:
        now = datetime.now(UTC)
        online = self.engine.connected_sites()
        revoked = self.ledger.revocations()
        views = self.engine.site_views()
        return [
            SiteView(
                name=row.name,
                online=row.name in online,
                agent_version=row.agent_version,
                last_seen_at=_aware(row.last_seen_at),
                certificate_serial=row.certificate_serial,
                certificate_expires_at=_aware(row.certificate_expires_at)
                if row.certificate_expires_at
                else None,
                certificate_warning=certificate_warning(row.certificate_expires_at, now),
                revoked=revoked.get(row.certificate_serial),
                datasets=[str(d.get("name", "")) for d in row.datasets],
                approvals=_approvals_text(views[row.name].approvals if row.name in views else None),
            )
            for row in self.ledger.sites()
        ]

    def runs(self, *, limit: int, offset: int = 0, status: str | None = None) -> RunPage:
        rows = self.ledger.runs_page(limit=limit, offset=offset, status=status)
        counts = self.ledger.hop_counts([r.id for r in rows])
        totals = self.ledger.run_status_counts()
        total = totals.get(status, 0) if status else sum(totals.values())
        return RunPage(
            runs=[_summary(r, counts.get(r.id, {})) for r in rows],
            total=total,
            offset=offset,
            limit=limit,
        )

    def overview(self, active_studies: list[ActiveStudy] | None = None) -> Overview:
        sites = self.sites()
        active = [
            *self.ledger.runs_page(limit=50, status="running"),
            *self.ledger.runs_page(limit=50, status="paused"),
        ]
        counts = self.ledger.hop_counts([r.id for r in active])
        return Overview(
            sites=sites,
            sites_online=sum(s.online for s in sites),
            active_runs=[_summary(r, counts.get(r.id, {})) for r in active],
            run_counts=self.ledger.run_status_counts(),
            active_studies=active_studies or [],
        )

    def _run(self, run_id: str) -> RunRow:
        try:
            return self.ledger.run(run_id)
        except KeyError:
            raise NotFound(f"no run {run_id!r}") from None

    def _checkpoint_view(self, row: CheckpointRow) -> CheckpointView:
        if not row.signature:
            signature = "unsigned"
        else:
            try:
                if row.producer_site == AGGREGATOR:  # a round's aggregate or server state
                    verify_aggregate_custody(row.sha256, bytes.fromhex(row.signature),
                                             row.producer_certificate.encode(),
                                             ca_pem=self.engine.ca_pem)  # fmt: skip
                else:
                    verify_custody(row.sha256, bytes.fromhex(row.signature),
                                   row.producer_certificate.encode(), ca_pem=self.engine.ca_pem,
                                   producer=row.producer_site)  # fmt: skip
                signature = "verified"
            except (SignatureError, ValueError) as exc:
                signature = f"does not verify: {exc}"
        return CheckpointView(
            sha256=row.sha256, size=row.size, producer_site=row.producer_site, hop_id=row.hop_id,
            parent_sha256=row.parent_sha256, stored_at=_aware(row.stored_at), signature=signature,
        )  # fmt: skip

    def run_detail(self, run_id: str) -> RunDetail:
        run = self._run(run_id)
        status = run_status(self.engine, run)
        checkpoints = self.ledger.checkpoints_of_run(run_id)
        sizes = {c.sha256: c.size for c in checkpoints}
        hops: list[HopView] = []
        for row, entry in zip(run.hops, status.hops, strict=True):
            duration = None
            if row.leased_at is not None and row.committed_at is not None:
                duration = (_aware(row.committed_at) - _aware(row.leased_at)).total_seconds()
            train = None
            if row.train_started_at_ns and row.train_finished_at_ns:
                train = (row.train_finished_at_ns - row.train_started_at_ns) / 1e9
            hops.append(
                HopView(
                    index=row.index, hop_id=row.id, site=row.site, status=entry.status,
                    attempts=row.attempts, retries=max(row.attempts - 1, 0), step=entry.step,
                    total_steps=entry.total_steps, duration_seconds=duration,
                    train_seconds=train,
                    bytes=sizes.get(row.output_sha256) if row.output_sha256 else None,
                    input_sha256=row.input_sha256, output_sha256=row.output_sha256,
                    error_code=row.error_code, error=row.error,
                    metrics={k: float(v) for k, v in (row.metrics or {}).items()},
                )
            )  # fmt: skip
        counts: dict[str, int] = {}
        for hop in run.hops:
            counts[hop.status] = counts.get(hop.status, 0) + 1
        summary = _summary(run, counts)
        return RunDetail(
            **summary.model_dump(),
            holder=self._holder(run),
            approval_bundle_sha256=status.approval_bundle_sha256,  # kept per run and plan
            final_sha256=run.final_sha256,
            adapter_available=self.adapter_available(run_id),
            plan=run.plan,
            hops=hops,
            rounds=[
                RoundView(
                    number=r.number,
                    status=r.status,
                    input_sha256=r.input_sha256 or None,
                    output_sha256=r.output_sha256 or None,
                    members=[m.name for m in r.members],
                    contributions=[(c.member, c.sha256, c.examples) for c in r.contributions],
                    dropped=list(r.dropped),
                    metrics=dict(r.metrics),
                    error=r.error or None,
                )
                for r in status.rounds
            ],
            evaluations=[
                EvaluationView(
                    evaluation_id=e.id,
                    site=e.site,
                    split=e.split,
                    status=e.status,
                    metrics={k: float(v) for k, v in (e.metrics or {}).items()},
                    error=e.error,
                )
                for e in run.evaluations
            ],
            checkpoints=[self._checkpoint_view(c) for c in checkpoints],
        )

    def _holder(self, run: RunRow) -> str:
        if run.status == "completed":
            return "training finished: the final adapter is at the coordinator"
        current = next((h for h in run.hops if h.status not in ("committed", "skipped")), None)
        if current is None:
            return "no hop left"
        if current.status in LIVE_HOP_STATES:
            return f"{current.site} holds the model (hop {current.index}, {current.status})"
        if run.status == "running":
            return f"waiting for {current.site} to take hop {current.index}"
        return f"{run.status}: next hop {current.index} at {current.site}"

    def events(
        self,
        *,
        limit: int,
        before: int | None = None,
        run_id: str | None = None,
        site: str | None = None,
        kind: str | None = None,
    ) -> EventPage:
        rows = self.ledger.events_page(limit=limit + 1, before=before, run_id=run_id, site=site,
                                       kind=kind)  # fmt: skip
        more = len(rows) > limit
        rows = rows[:limit]
        return EventPage(
            events=[event_view(r) for r in rows],
            next_before=rows[-1].seq if more and rows else None,
        )

    def verify(self) -> VerifyResult:
        broken = self.ledger.verify_chain()
        return VerifyResult(
            ok=broken is None,
            events=self.ledger.event_count(),
            head=self.ledger.head(),
            broken_seq=broken.seq if broken else None,
            reason=broken.reason if broken else None,
        )

    def adapter_available(self, run_id: str) -> bool:
        return (self.engine.final_adapter_dir(run_id) / "adapter_model.safetensors").is_file()

    def adapter_zip(self, run_id: str) -> bytes:
        """The final adapter's PEFT folder as a zip (adapter_model.safetensors + config)."""
        run = self._run(run_id)
        folder = self.engine.final_adapter_dir(run.id)
        if run.status != "completed" or not self.adapter_available(run.id):
            raise NotFound(f"run {run_id} has no final adapter (it is {run.status})")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.iterdir()):
                if path.is_file():
                    archive.write(path, f"{run.name}-{run.id[:8]}/{path.name}")
        return buffer.getvalue()

    # ---- actions (each one engine call; the engine writes the ledger event) ---------------------

    async def start_run(self, plan_text: str, *, by: str, allow_offline: bool = False) -> str:
        """Starts a run after the same preflight as `baton run start` (PreflightFailed: why not)."""
        plan = parse_plan_text(plan_text)
        self.engine.preflight(plan, allow_offline=allow_offline)
        return await self.engine.start_run(plan, by=by)

    async def pause(self, run_id: str, *, by: str) -> None:
        await self.engine.pause_run(run_id, by=by)

    async def resume(self, run_id: str, *, by: str) -> None:
        await self.engine.resume_run(run_id, by=by)

    async def abort(self, run_id: str, reason: str, *, by: str) -> None:
        await self.engine.abort_run(run_id, reason or f"aborted by {by}", by=by)

    async def skip(self, run_id: str, *, by: str) -> None:
        await self.engine.skip_failed_hop(run_id, by=by)

    async def evaluate(self, run_id: str, split: str, sites: list[str], *, by: str) -> list[str]:
        return await self.engine.evaluate_run(run_id, split, sites, by=by)

    async def revoke(self, serial: str, reason: str, *, by: str) -> int:
        return await self.engine.revoke(serial.lower(), reason, by=by)


def _approvals_text(approvals: SiteApprovals | None) -> str:
    """What a site said at its last hello about the run bundles it will run."""
    if approvals is None:
        return "not reported since the coordinator started"
    if approvals.not_required:
        return "runs any bundle (approval not required)"
    listed = f"{len(approvals.bundles)} bundle(s) approved"
    return f"{listed}; local rules may approve others" if approvals.by_policy else listed
