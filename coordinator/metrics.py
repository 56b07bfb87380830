"""The coordinator's Prometheus metrics: one registry per coordinator, base units, small labels.

Labels only ever take values from fixed sets (hop statuses, phases, gRPC codes): never a run,
hop or site name, so a consortium of any size keeps a bounded number of series.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["HOP_PHASES", "HOP_STATUSES", "CoordinatorMetrics"]

HOP_STATUSES = ("committed", "retried", "skipped", "failed", "released")
HOP_PHASES = ("leased", "downloading", "training", "uploading", "committing")
_REFUSAL_REASONS = (
    "unauthenticated",
    "permission_denied",
    "failed_precondition",
    "invalid_argument",
    "not_found",
    "out_of_range",
)
# Handoffs and phases span milliseconds (tabular) to hours (LLM hops on CPU).
_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)


class CoordinatorMetrics:
    """Counters, histograms and gauges the run engine and servicers update.

    prometheus_client and the metric families are made on first use (`build`), not on the way
    to a coordinator's readiness (~50 ms of CPU): `coordinator serve` builds them once the first
    sites' hellos are over (`coordinator.server.settle_when_quiet`), and whatever reads a
    metric before then builds them first (another thread building them meanwhile is waited
    for), so no update is lost or counted twice.
    """

    registry: CollectorRegistry
    hops: Counter
    handoff: Histogram
    phase: Histogram
    checkpoint_bytes: Counter
    lease_expiries: Counter
    refusals: Counter
    connected_sites: Gauge

    def __init__(self) -> None:
        self._phase_started: dict[str, tuple[str, float]] = {}
        self._connected: Callable[[], int] | None = None
        self._building = threading.Lock()
        self._built = False

    if not TYPE_CHECKING:  # (mypy checks the metrics' names against the annotations above)

        def __getattr__(self, name: str) -> Any:
            # Only a metric not made yet gets here (every other attribute is set in __init__).
            if name.startswith("_"):
                raise AttributeError(name)
            self.build()
            return object.__getattribute__(self, name)

    def build(self) -> None:
        """Imports prometheus_client and makes the metric families, once (any thread)."""
        with self._building:
            if self._built:
                return
            self._build()
            self._built = True

    def _build(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.hops = Counter(
            "baton_hops", "Hops settled, by outcome", ["status"], registry=self.registry
        )
        self.handoff = Histogram(
            "baton_handoff_seconds",
            "End of one hop's training to the start of the next hop's training (site clocks)",
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.phase = Histogram(
            "baton_hop_phase_seconds",
            "Time a hop spent in each phase, as the coordinator saw it",
            ["phase"],
            buckets=_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.checkpoint_bytes = Counter(
            "baton_checkpoint_bytes",
            "Checkpoint bytes moved between the coordinator and sites",
            ["direction"],
            registry=self.registry,
        )
        self.lease_expiries = Counter(
            "baton_lease_expiries", "Hop leases that expired without a heartbeat",
            registry=self.registry,
        )  # fmt: skip
        self.refusals = Counter(
            "baton_refusals", "Calls refused, by gRPC status", ["reason"], registry=self.registry
        )
        self.connected_sites = Gauge(
            "baton_connected_sites", "Sites with an open task stream", registry=self.registry
        )
        # Every known label value exists from the start, so rate() sees the first increment.
        for status in HOP_STATUSES:
            self.hops.labels(status=status)
        for phase in HOP_PHASES:
            self.phase.labels(phase=phase)
        for direction in ("upload", "download"):
            self.checkpoint_bytes.labels(direction=direction)
        for reason in (*_REFUSAL_REASONS, "other"):
            self.refusals.labels(reason=reason)
        connected = self._connected
        if connected is not None:
            self.connected_sites.set_function(lambda: float(connected()))

    def track_connected_sites(self, count: Callable[[], int]) -> None:
        """The connected-sites gauge reads `count()` at each scrape."""
        with self._building:
            self._connected = count
            if self._built:  # else `build` sets the gauge's function
                self.connected_sites.set_function(lambda: float(count()))

    def hop_settled(self, status: str) -> None:
        self.hops.labels(status=status if status in HOP_STATUSES else "failed").inc()

    def refusal(self, code_name: str) -> None:
        reason = code_name.lower()
        self.refusals.labels(reason=reason if reason in _REFUSAL_REASONS else "other").inc()

    def hop_phase(self, hop_id: str, phase: str | None) -> None:
        """Marks the hop's new phase (None: the hop left the lease); observes the one it left."""
        now = time.monotonic()
        if phase is not None and phase not in HOP_PHASES:
            phase = "training"
        previous = self._phase_started.pop(hop_id, None)
        if previous is not None and previous[0] != phase:
            self.phase.labels(phase=previous[0]).observe(now - previous[1])
        elif previous is not None:
            self._phase_started[hop_id] = previous
            return
        if phase is not None:
            self._phase_started[hop_id] = (phase, now)

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
