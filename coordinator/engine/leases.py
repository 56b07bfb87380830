"""The in-memory side of hop leases: whom a task went to, deadlines, backoffs and progress.

The ledger holds each lease (its token and state, held in memory by `ActiveRuns`); this holds
what only matters while the coordinator runs, and checks that a site's call carries its hop's
current lease.
"""

from __future__ import annotations

import time
from collections.abc import Container
from dataclasses import dataclass

from coordinator.engine.active_runs import ActiveRuns
from coordinator.engine.rules import failure_policy
from coordinator.engine.sessions import SiteSession
from coordinator.errors import NotFound, PermissionDenied, StaleLease
from coordinator.ledger import LIVE_HOP_STATES, HopRow, RunRow
from coordinator.metrics import CoordinatorMetrics

__all__ = ["HopLeases", "HopProgress"]


@dataclass
class HopProgress:
    phase: str = ""
    step: int = 0
    total_steps: int = 0
    loss: float = 0.0


class HopLeases:
    """Per-hop timers and the stream each hop's task was sent on, keyed by hop id."""

    def __init__(self, runs: ActiveRuns, metrics: CoordinatorMetrics) -> None:
        self.runs = runs
        self.metrics = metrics
        self.sent: dict[str, SiteSession] = {}  # hop id -> session its task went to
        self.progress: dict[str, HopProgress] = {}
        self.deadlines: dict[str, float] = {}  # hop id -> monotonic lease deadline
        self.not_before: dict[str, float] = {}  # hop id -> retry backoff end
        self.waiting_since: dict[str, float] = {}  # hop id -> when it began waiting for its site
        self.wait_logged: dict[str, float] = {}  # hop id -> when "waits for site" was logged

    def leased_hop(self, site: str, hop_id: str, lease_token: str) -> tuple[RunRow, HopRow]:
        """The hop and its run, if `site` holds the hop's current lease under a running run."""
        run, hop = self.find_hop(hop_id)
        if hop.site != site:
            raise PermissionDenied(f"hop {hop_id} is not leased to site {site}")
        if hop.status not in LIVE_HOP_STATES or not lease_token or hop.lease_token != lease_token:
            raise StaleLease(f"lease token for hop {hop_id} is not current")
        if run.status != "running":
            raise StaleLease(f"run {run.id} is {run.status}")
        return run, hop

    def find_hop(self, hop_id: str) -> tuple[RunRow, HopRow]:
        """The hop and its running run, by id, from the runs held in memory (no query)."""
        found = self.runs.hop(hop_id)
        if found is None:
            raise NotFound(f"no active hop {hop_id}")
        return found

    def extend(self, run: RunRow, hop_id: str) -> None:
        """Moves the hop's lease deadline to a full lease timeout from now."""
        self.deadlines[hop_id] = time.monotonic() + failure_policy(run).lease_timeout_seconds

    def overdue(
        self, run: RunRow, hop: HopRow, online: Container[str], now: float
    ) -> tuple[str, str] | None:
        """Why `hop` must fail now, as (code, message), or None.

        A live hop whose lease passed its deadline (the clock starts at its first check) has
        expired; a pending hop that waited longer than the run's site wait for its offline site
        gives up on it (and stops waiting). `now` is `time.monotonic()`.
        """
        policy = failure_policy(run)
        if hop.status in LIVE_HOP_STATES:
            deadline = self.deadlines.setdefault(hop.id, now + policy.lease_timeout_seconds)
            if now > deadline:
                return "lease-expired", "no heartbeat before the lease deadline"
        waiting = self.waiting_since.get(hop.id)
        if (
            hop.status == "pending"
            and waiting is not None
            and hop.site not in online
            and now - waiting > policy.site_wait_seconds
        ):
            self.waiting_since.pop(hop.id, None)
            return "site-unavailable", f"site {hop.site} stayed offline"
        return None

    def forget(self, hop_id: str) -> None:
        """Drops a hop that left its lease (its task, progress, deadline and backoff)."""
        self.metrics.hop_phase(hop_id, None)
        for table in (self.sent, self.progress, self.deadlines, self.not_before):
            table.pop(hop_id, None)
