"""The coordinator's SQL ledger (SQLAlchemy + Alembic; SQLite default, PostgreSQL in production)."""

from coordinator.ledger._repository import (
    GENESIS_HASH,
    LIVE_HOP_STATES,
    TERMINAL_RUN_STATES,
    ChainBreak,
    Ledger,
    TransitionRefused,
    event_hash,
)
from coordinator.ledger.models import (
    AccountRow,
    ApiTokenRow,
    Base,
    CheckpointRow,
    EvaluationRow,
    EventRow,
    HopRow,
    RevocationRow,
    RunRow,
    SiteRow,
    StatisticsAnswerRow,
    StatisticsRequestRow,
)

__all__ = [
    "GENESIS_HASH",
    "LIVE_HOP_STATES",
    "TERMINAL_RUN_STATES",
    "AccountRow",
    "ApiTokenRow",
    "Base",
    "ChainBreak",
    "CheckpointRow",
    "EvaluationRow",
    "EventRow",
    "HopRow",
    "Ledger",
    "RevocationRow",
    "RunRow",
    "SiteRow",
    "StatisticsAnswerRow",
    "StatisticsRequestRow",
    "TransitionRefused",
    "event_hash",
]
