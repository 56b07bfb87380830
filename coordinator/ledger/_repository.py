"""The ledger's repository: every state change is one transaction that also appends one event.

`Ledger` is composed of one mixin per job (each in its own module, over `LedgerCore`).
"""

from __future__ import annotations

import logging

from coordinator.ledger._chain import (
    GENESIS_HASH,
    LIVE_HOP_STATES,
    TERMINAL_RUN_STATES,
    ChainBreak,
    HeadObserver,
    LedgerVerification,
    TransitionRefused,
    event_hash,
    locked_get,
    utcnow,
)
from coordinator.ledger._checkpoints import CheckpointRecords
from coordinator.ledger._evaluations import EvaluationRecords
from coordinator.ledger._migrations import _MIGRATIONS, script_heads
from coordinator.ledger._pages import DashboardPages
from coordinator.ledger._rounds import RoundRecords
from coordinator.ledger._runs import RunRecords
from coordinator.ledger._verification import EventLog

__all__ = [
    "GENESIS_HASH",
    "LIVE_HOP_STATES",
    "TERMINAL_RUN_STATES",
    "_MIGRATIONS",
    "ChainBreak",
    "HeadObserver",
    "Ledger",
    "LedgerVerification",
    "TransitionRefused",
    "event_hash",
    "locked_get",
    "script_heads",
    "utcnow",
]

logger = logging.getLogger(__name__)


class Ledger(
    EventLog, RunRecords, CheckpointRecords, EvaluationRecords, RoundRecords, DashboardPages
):
    """SQL ledger of sites, runs, hops, checkpoints and events (SQLite or PostgreSQL)."""
