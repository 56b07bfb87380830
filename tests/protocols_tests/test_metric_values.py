"""Metrics counted in plain Python expose what prometheus_client's own metrics would, and do not
import it until something reads them."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram
from prometheus_client.parser import text_string_to_metric_families

from protocols.metric_values import Counter, Gauge, Histogram, MetricSet

_BUCKETS = (0.1, 1, 10)


def _samples(text: bytes) -> set[tuple[str, tuple[tuple[str, str], ...], float | None]]:
    """Every sample's name, labels and value (a `_created` one's value is a timestamp: None)."""
    return {
        (s.name, tuple(sorted(s.labels.items())), None if s.name.endswith("_created") else s.value)
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_the_exposition_is_prometheus_clients_own() -> None:
    ours = MetricSet()
    hops = ours.add(Counter("demo_hops", "Hops", ["status"]))
    expiries = ours.add(Counter("demo_expiries", "Expiries"))
    phase = ours.add(Histogram("demo_phase_seconds", "Phases", ["phase"], buckets=_BUCKETS))
    plain = ours.add(Histogram("demo_seconds", "Seconds", buckets=_BUCKETS))
    gauge = ours.add(Gauge("demo_sites", "Sites"))
    registry = CollectorRegistry(auto_describe=True)
    their_hops = PromCounter("demo_hops", "Hops", ["status"], registry=registry)
    their_expiries = PromCounter("demo_expiries", "Expiries", registry=registry)
    their_phase = PromHistogram(
        "demo_phase_seconds", "Phases", ["phase"], buckets=_BUCKETS, registry=registry
    )
    their_plain = PromHistogram("demo_seconds", "Seconds", buckets=_BUCKETS, registry=registry)
    their_gauge = PromGauge("demo_sites", "Sites", registry=registry)
    for counter in (hops, their_hops):
        counter.labels(status="committed").inc(3)
        counter.labels(status="failed")
    for counter in (expiries, their_expiries):
        counter.inc()
    for histogram in (phase, their_phase):
        for value in (0.05, 0.1, 0.5, 20):
            histogram.labels(phase="training").observe(value)
        histogram.labels(phase="leased")
    for histogram in (plain, their_plain):
        histogram.observe(2)
    for each in (gauge, their_gauge):
        each.set_function(lambda: 4.0)
    assert _samples(ours.exposition()) == _samples(generate_latest(registry))


def test_counting_does_not_import_prometheus_client_and_reading_does() -> None:
    probe = (
        "import sys\n"
        "from coordinator.metrics import CoordinatorMetrics\n"
        "from site_agent.metrics import SiteMetrics\n"
        "site, coordinator = SiteMetrics(), CoordinatorMetrics()\n"
        "site.hop('trained'); site.training.observe(1.5)\n"
        "coordinator.hop_settled('committed'); coordinator.handoff.observe(0.2)\n"
        "print('prometheus_client' in sys.modules)\n"
        "text = coordinator.exposition().decode()\n"
        "line = 'baton_hops_total{status=\"committed\"} 1.0'\n"
        "print('prometheus_client' in sys.modules, line in text)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "True", "True"]
