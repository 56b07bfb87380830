"""Request and response bodies of the dashboard's JSON API (never database rows)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from coordinator.study_request import StopMode

__all__ = [
    "ActionResult",
    "ActiveStudy",
    "CheckpointView",
    "EvaluateRequest",
    "EvaluationView",
    "EventPage",
    "EventView",
    "HopView",
    "Overview",
    "RevokeRequest",
    "RevokeSessionsRequest",
    "RunDetail",
    "RunPage",
    "RunSummary",
    "SessionView",
    "SiteView",
    "StartRunRequest",
    "StopStudyRequest",
    "StudyWorkerView",
    "VerifyResult",
]


class SiteView(BaseModel):
    name: str
    online: bool
    agent_version: str
    last_seen_at: datetime
    certificate_serial: str
    certificate_expires_at: datetime | None
    certificate_warning: str | None = Field(description="expired / expires soon, or null")
    revoked: str | None = Field(description="why its certificate was revoked, or null")
    datasets: list[str]
    approvals: str = Field(description="the run bundles the site said at hello it will run")


class RunSummary(BaseModel):
    run_id: str
    name: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    hops_total: int
    hops_committed: int
    error: str | None


class RunPage(BaseModel):
    runs: list[RunSummary]
    total: int
    offset: int
    limit: int


class HopView(BaseModel):
    index: int
    hop_id: str
    site: str
    status: str = Field(description="ledger status, or the live phase of a leased hop")
    attempts: int
    retries: int
    step: int
    total_steps: int
    duration_seconds: float | None = Field(description="from lease to commit")
    train_seconds: float | None
    bytes: int | None = Field(description="size of the checkpoint this hop produced")
    input_sha256: str | None
    output_sha256: str | None
    error_code: str | None
    error: str | None
    metrics: dict[str, float]


class EvaluationView(BaseModel):
    evaluation_id: str
    site: str
    split: str
    status: str
    metrics: dict[str, float]
    error: str | None


class CheckpointView(BaseModel):
    sha256: str
    size: int
    producer_site: str
    hop_id: str
    parent_sha256: str | None
    stored_at: datetime
    signature: str = Field(description="verified, unsigned, or why it does not verify")


class RoundView(BaseModel):
    """One round of a federated or hybrid run."""

    number: int
    status: str
    input_sha256: str | None
    output_sha256: str | None
    members: list[str]
    contributions: list[tuple[str, str, float]] = Field(
        description="(member, checkpoint sha256, examples it is weighted by)"
    )
    dropped: list[str]
    metrics: dict[str, float]
    error: str | None


class RunDetail(RunSummary):
    holder: str = Field(description="where the model is now, in words")
    approval_bundle_sha256: str
    final_sha256: str | None
    adapter_available: bool
    plan: dict[str, Any]
    hops: list[HopView]
    evaluations: list[EvaluationView]
    checkpoints: list[CheckpointView]
    rounds: list[RoundView] = Field(default_factory=list)  # federated and hybrid runs


class ActiveStudy(BaseModel):
    name: str
    status: str = Field(description="running, stopping or orphaned")
    pid: int | None
    started_by: str
    started_at: datetime


class Overview(BaseModel):
    sites: list[SiteView]
    sites_online: int
    active_runs: list[RunSummary]
    run_counts: dict[str, int]
    active_studies: list[ActiveStudy] = Field(
        default_factory=list, description="studies whose worker this coordinator runs"
    )


class EventView(BaseModel):
    seq: int
    at: str
    kind: str
    run_id: str | None
    hop_id: str | None
    site: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str


class EventPage(BaseModel):
    events: list[EventView]
    next_before: int | None = Field(description="pass as `before` for the next (older) page")


class VerifyResult(BaseModel):
    ok: bool
    events: int
    head: str
    broken_seq: int | None
    reason: str | None


class StartRunRequest(BaseModel):
    plan: str = Field(description="the run plan as TOML or JSON text", max_length=200_000)
    allow_offline: bool = Field(
        default=False, description="queue the run even if some of its sites are offline"
    )


class EvaluateRequest(BaseModel):
    split: str = "validation"
    sites: list[str] = Field(default_factory=list)


class RevokeRequest(BaseModel):
    serial: str = Field(max_length=64)
    reason: str = Field(default="revoked from the dashboard", max_length=500)


class ActionResult(BaseModel):
    run_id: str | None = None
    status: str
    message: str


class StopStudyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: StopMode = Field(
        description="finish-trial: stop after the current trial; abort-trial: abort its run now"
    )


class StudyWorkerView(BaseModel):
    id: str
    study: str
    status: str = Field(description="running, stopping, finished, failed, stopped or orphaned")
    pid: int | None
    alive: bool
    started_by: str
    started_at: datetime
    stop_mode: str | None
    stopped_by: str | None
    ended_at: datetime | None
    exit_code: int | None
    log_tail: str = Field(description="the end of the worker's output")


class SessionView(BaseModel):
    key: str = Field(description="names the session for revocation (not its token)")
    account: str
    role: str
    via: str = Field(description="password, link or certificate")
    client: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


class RevokeSessionsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    account: str = Field(min_length=1, max_length=64)
    session: str | None = Field(
        default=None, pattern="^[0-9a-f]{16}$", description="one session's key; null: all"
    )
