"""The site agent's Prometheus metrics (hops, training time, checkpoint bytes) and their port.

Counted in plain Python (`protocols.metric_values`): prometheus_client is imported only if the
site serves /metrics (``metrics_port``), not on the way to its hello."""

from __future__ import annotations

import logging

from protocols.metric_values import Counter, Histogram, MetricSet

__all__ = ["SITE_HOP_OUTCOMES", "SiteMetrics"]

logger = logging.getLogger(__name__)

SITE_HOP_OUTCOMES = ("trained", "refused", "cancelled", "released")
_TRAINING_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 43200)


class SiteMetrics:
    """Counters and histograms of one site agent, in their own set."""

    def __init__(self) -> None:
        self.set = MetricSet()
        self.hops = self.set.add(
            Counter("baton_site_hops", "Hops this site ran, by outcome", ["status"])
        )
        self.training = self.set.add(
            Histogram(
                "baton_site_training_seconds", "Wall time of each hop's training",
                buckets=_TRAINING_BUCKETS,
            )
        )  # fmt: skip
        self.checkpoint_bytes = self.set.add(
            Counter(
                "baton_site_checkpoint_bytes",
                "Checkpoint bytes moved to and from the coordinator",
                ["direction"],
            )
        )
        for status in SITE_HOP_OUTCOMES:
            self.hops.labels(status=status)
        for direction in ("upload", "download"):
            self.checkpoint_bytes.labels(direction=direction)

    def hop(self, status: str) -> None:
        self.hops.labels(status=status).inc()

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics on a daemon thread; returns the bound port (port 0 picks one)."""
        from prometheus_client import start_http_server

        server, _ = start_http_server(port, addr=host, registry=self.set.registry())
        bound = int(server.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound
