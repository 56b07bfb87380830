"""The coordinator's SQL ledger (SQLAlchemy + Alembic; SQLite default, PostgreSQL in production)."""

from coordinator.ledger._repository import GENESIS_HASH, ChainBreak, Ledger, event_hash
from coordinator.ledger.models import (
    Base,
    CheckpointRow,
    EvaluationRow,
    EventRow,
    HopRow,
    RunRow,
    SiteRow,
)

__all__ = [
    "GENESIS_HASH",
    "Base",
    "ChainBreak",
    "CheckpointRow",
    "EvaluationRow",
    "EventRow",
    "HopRow",
    "Ledger",
    "RunRow",
    "SiteRow",
    "event_hash",
]
