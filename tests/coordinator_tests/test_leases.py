"""HopLeases.overdue: the lease-deadline and site-wait check that hop chains and rounds share."""

from __future__ import annotations

from pathlib import Path

from coordinator.engine.active_runs import ActiveRuns
from coordinator.engine.leases import HopLeases
from coordinator.ledger import HopRow, Ledger, RunRow
from coordinator.metrics import CoordinatorMetrics

FAILURE = {"lease_timeout_seconds": 10, "site_wait_seconds": 5}


def _leases(tmp_path: Path) -> HopLeases:
    ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.sqlite3'}")
    return HopLeases(ActiveRuns(ledger), CoordinatorMetrics())


def _run() -> RunRow:
    return RunRow(id="r1", plan={"failure": FAILURE})


def test_a_live_hop_expires_once_its_lease_deadline_passed(tmp_path: Path) -> None:
    leases, hop = _leases(tmp_path), HopRow(id="h1", site="a", status="leased")
    assert leases.overdue(_run(), hop, {"a"}, now=100.0) is None  # the clock starts here
    assert leases.deadlines["h1"] == 110.0
    assert leases.overdue(_run(), hop, {"a"}, now=110.0) is None
    assert leases.overdue(_run(), hop, {"a"}, now=110.5) == (
        "lease-expired", "no heartbeat before the lease deadline",
    )  # fmt: skip


def test_a_pending_hop_gives_up_on_its_offline_site_after_the_site_wait(tmp_path: Path) -> None:
    leases, hop = _leases(tmp_path), HopRow(id="h1", site="a", status="pending")
    assert leases.overdue(_run(), hop, set(), now=100.0) is None  # not waiting yet
    leases.waiting_since["h1"] = 100.0
    assert leases.overdue(_run(), hop, set(), now=105.0) is None
    assert leases.overdue(_run(), hop, {"a"}, now=106.0) is None  # the site is back
    assert leases.overdue(_run(), hop, set(), now=106.0) == (
        "site-unavailable", "site a stayed offline",
    )  # fmt: skip
    assert "h1" not in leases.waiting_since
    assert "h1" not in leases.deadlines  # a pending hop holds no lease
