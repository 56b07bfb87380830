"""The coordinator's SQL ledger (SQLAlchemy + Alembic; SQLite default, PostgreSQL in production)."""

from coordinator.ledger._heads import HEADS_FILE, HeadProblem, HeadSigner, check_heads, read_heads
from coordinator.ledger._integrity import RowMismatch
from coordinator.ledger._repository import (
    GENESIS_HASH,
    LIVE_HOP_STATES,
    TERMINAL_RUN_STATES,
    ChainBreak,
    Ledger,
    LedgerVerification,
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
    RoundRow,
    RunRow,
    SiteRow,
    StatisticsAnswerRow,
    StatisticsRequestRow,
)

__all__ = [
    "GENESIS_HASH",
    "HEADS_FILE",
    "LIVE_HOP_STATES",
    "TERMINAL_RUN_STATES",
    "AccountRow",
    "ApiTokenRow",
    "Base",
    "ChainBreak",
    "CheckpointRow",
    "EvaluationRow",
    "EventRow",
    "HeadProblem",
    "HeadSigner",
    "HopRow",
    "Ledger",
    "LedgerVerification",
    "RevocationRow",
    "RoundRow",
    "RowMismatch",
    "RunRow",
    "SiteRow",
    "StatisticsAnswerRow",
    "StatisticsRequestRow",
    "TransitionRefused",
    "check_heads",
    "event_hash",
    "read_heads",
]
