"""SQLAlchemy models of the ledger: sites, runs, hops, checkpoints and the chained event log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

__all__ = [
    "AccountRow",
    "ApiTokenRow",
    "Base",
    "CheckpointRow",
    "DashboardSessionRow",
    "EvaluationRow",
    "EventRow",
    "HopRow",
    "RevocationRow",
    "RoundRow",
    "RunRow",
    "SiteRow",
    "StatisticsAnswerRow",
    "StatisticsRequestRow",
    "StudyWorkerRow",
]


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class SiteRow(Base):
    __tablename__ = "sites"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    agent_version: Mapped[str] = mapped_column(String(64), default="")
    capabilities: Mapped[list[Any]] = mapped_column(default=list)
    base_models: Mapped[list[Any]] = mapped_column(default=list)
    datasets: Mapped[list[Any]] = mapped_column(default=list)
    certificate_serial: Mapped[str] = mapped_column(String(64), default="")
    certificate_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ledger_seq: Mapped[int | None] = mapped_column(Integer)  # the event that last wrote it


class RunRow(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), index=True)
    plan: Mapped[dict[str, Any]]
    base_model_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    final_sha256: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    ledger_seq: Mapped[int | None] = mapped_column(Integer)  # the event that last wrote it

    hops: Mapped[list[HopRow]] = relationship(
        back_populates="run", order_by="HopRow.index", cascade="all, delete-orphan"
    )
    evaluations: Mapped[list[EvaluationRow]] = relationship(
        back_populates="run", order_by="EvaluationRow.created_at", cascade="all, delete-orphan"
    )


class HopRow(Base):
    __tablename__ = "hops"
    __table_args__ = (UniqueConstraint("run_id", "index"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    site: Mapped[str] = mapped_column(String(64))
    hyperparameters: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    leased_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    input_sha256: Mapped[str | None] = mapped_column(String(64), index=True)  # download checks
    output_sha256: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    train_started_at_ns: Mapped[int | None] = mapped_column(BigInteger)
    train_finished_at_ns: Mapped[int | None] = mapped_column(BigInteger)
    committed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    ledger_seq: Mapped[int | None] = mapped_column(Integer)  # the event that last wrote it

    run: Mapped[RunRow] = relationship(back_populates="hops")


class EvaluationRow(Base):
    """One site's metrics for one checkpoint on one split of its data."""

    __tablename__ = "evaluations"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), index=True)  # download checks
    site: Mapped[str] = mapped_column(String(64))
    split: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending, done, failed
    lease_token: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ledger_seq: Mapped[int | None] = mapped_column(Integer)  # the event that last wrote it

    run: Mapped[RunRow] = relationship(back_populates="evaluations")


class RoundRow(Base):
    """One round of a federated or hybrid run: its hops, its input and its aggregate."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)  # 1-based
    # pending, training (its input is fixed and its hops dispatched), aggregated, failed
    status: Mapped[str] = mapped_column(String(16))
    # [[site or group, [hop id, ...] in chain order], ...]: who trains this round
    members: Mapped[list[Any]] = mapped_column(default=list)
    input_sha256: Mapped[str | None] = mapped_column(String(64))  # None: fresh adapters
    output_sha256: Mapped[str | None] = mapped_column(String(64))  # the aggregate
    server_state_sha256: Mapped[str | None] = mapped_column(String(64))  # FedAdam/FedYogi
    # [[member, checkpoint sha256, examples], ...] in aggregation order
    contributions: Mapped[list[Any]] = mapped_column(default=list)
    dropped: Mapped[list[Any]] = mapped_column(default=list)  # [[member, reason], ...]
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[str | None] = mapped_column(Text)
    ledger_seq: Mapped[int | None] = mapped_column(Integer)  # the event that last wrote it


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    run_id: Mapped[str] = mapped_column(String(32), index=True)
    hop_id: Mapped[str] = mapped_column(String(32), index=True)  # a hand back's stored uploads
    producer_site: Mapped[str] = mapped_column(String(64))
    parent_sha256: Mapped[str | None] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]]
    tensors: Mapped[list[Any]]
    signature: Mapped[str] = mapped_column(Text, default="", server_default="")  # hex
    producer_certificate: Mapped[str] = mapped_column(Text, default="", server_default="")
    stored_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # stored; superseded (its hop was redone or ended without it); deleted (retention, gc).
    # Only a stored checkpoint's bytes are kept in the store.
    status: Mapped[str] = mapped_column(String(16), default="stored", server_default="stored")
    ledger_seq: Mapped[int | None] = mapped_column(Integer)  # the event that last wrote it


class RevocationRow(Base):
    """A certificate the coordinator refuses from now on, whoever presents it."""

    __tablename__ = "revocations"

    serial: Mapped[str] = mapped_column(String(64), primary_key=True)  # hex
    reason: Mapped[str] = mapped_column(Text)
    revoked_by: Mapped[str] = mapped_column(String(64))
    revoked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    ledger_seq: Mapped[int | None] = mapped_column(Integer)  # the event that last wrote it


class StatisticsRequestRow(Base):
    """An aggregate-statistics request to some sites and, once all answered, its pooled result."""

    __tablename__ = "statistics_requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(200))
    task_type: Mapped[str] = mapped_column(String(32))
    min_count: Mapped[int] = mapped_column(Integer)
    noise_std: Mapped[float] = mapped_column(Float)
    sites: Mapped[list[Any]]
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending, done, failed
    combined: Mapped[dict[str, Any]] = mapped_column(default=dict)  # empty until done
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A pending request fails after this; None (requests older than expiry): never.
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    # > 1: sites also answer per cross-validation fold (tabular); 0: one global answer.
    cv_folds: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    ledger_seq: Mapped[int | None] = mapped_column(Integer)  # the event that last wrote it

    answers: Mapped[list[StatisticsAnswerRow]] = relationship(
        back_populates="request",
        order_by="StatisticsAnswerRow.site",
        cascade="all, delete-orphan",
    )


class StatisticsAnswerRow(Base):
    """One site's answer to a statistics request: the aggregates it released, or its refusal."""

    __tablename__ = "statistics_answers"

    request_id: Mapped[str] = mapped_column(ForeignKey("statistics_requests.id"), primary_key=True)
    site: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # pending, done, failed
    lease_token: Mapped[str | None] = mapped_column(String(64))
    aggregates: Mapped[dict[str, Any]] = mapped_column(default=dict)  # empty unless done
    error_code: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    ledger_seq: Mapped[int | None] = mapped_column(Integer)  # the event that last wrote it

    request: Mapped[StatisticsRequestRow] = relationship(back_populates="answers")


class EventRow(Base):
    """Append-only; each row's hash covers the previous row's hash (tamper evidence)."""

    __tablename__ = "events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[str] = mapped_column(String(40))  # ISO-8601 UTC, hashed as written
    kind: Mapped[str] = mapped_column(String(64), index=True)
    run_id: Mapped[str | None] = mapped_column(String(32), index=True)
    hop_id: Mapped[str | None] = mapped_column(String(32), index=True)  # a hop's validation
    site: Mapped[str | None] = mapped_column(String(64), index=True)
    payload: Mapped[dict[str, Any]]
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64), unique=True)


class AccountRow(Base):
    """A dashboard account: a person with a role and an argon2 password hash."""

    __tablename__ = "accounts"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))  # viewer, operator, admin
    password_hash: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ApiTokenRow(Base):
    """A bearer token of an account (kind "api"), or a one-time login link (kind "login").

    Only the token's SHA-256 is stored: the token itself is shown once, when it is made.
    """

    __tablename__ = "api_tokens"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    account: Mapped[str] = mapped_column(ForeignKey("accounts.name"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DashboardSessionRow(Base):
    """A dashboard login session; only the SHA-256 of the cookie's token is stored.

    Certificate logins have no account row, so the account is a name with the role it logged in
    with, not a foreign key.
    """

    __tablename__ = "dashboard_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    account: Mapped[str] = mapped_column(String(64), index=True)
    role: Mapped[str] = mapped_column(String(16))
    via: Mapped[str] = mapped_column(String(16))  # password, link or certificate
    csrf_token: Mapped[str] = mapped_column(String(64))
    client: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StudyWorkerRow(Base):
    """A `baton study start` process the coordinator launched for the dashboard."""

    __tablename__ = "study_workers"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    study: Mapped[str] = mapped_column(String(200), index=True)
    # running, stopping, finished, failed, stopped, orphaned
    status: Mapped[str] = mapped_column(String(16), index=True)
    pid: Mapped[int | None] = mapped_column(Integer)
    process_started_at: Mapped[float | None] = mapped_column(Float)  # to recognise the pid
    options: Mapped[dict[str, Any]]
    started_by: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    stop_mode: Mapped[str | None] = mapped_column(String(16))  # finish-trial or abort-trial
    stopped_by: Mapped[str | None] = mapped_column(String(128))
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    exit_code: Mapped[int | None] = mapped_column(Integer)
    log_path: Mapped[str] = mapped_column(Text)
