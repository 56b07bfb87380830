"""The site agent's Prometheus metrics (hops, training time, checkpoint bytes) and their port."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

__all__ = ["SITE_HOP_OUTCOMES", "SiteMetrics"]

logger = logging.getLogger(__name__)

SITE_HOP_OUTCOMES = ("trained", "refused", "cancelled", "released", "withdrawn")
_TRAINING_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 43200)


class SiteMetrics:
    """Counters and histograms of one site agent, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.hops = Counter(
            "baton_site_hops", "Hops this site ran, by outcome", ["status"],
            registry=self.registry,
        )  # fmt: skip
        self.training = Histogram(
            "baton_site_training_seconds", "Wall time of each hop's training",
            buckets=_TRAINING_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.checkpoint_bytes = Counter(
            "baton_site_checkpoint_bytes", "Checkpoint bytes moved to and from the coordinator",
            ["direction"], registry=self.registry,
        )  # fmt: skip
        for status in SITE_HOP_OUTCOMES:
            self.hops.labels(status=status)
        for direction in ("upload", "download"):
            self.checkpoint_bytes.labels(direction=direction)

    def hop(self, status: str) -> None:
        self.hops.labels(status=status).inc()

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics on a daemon thread; returns the bound port (port 0 picks one)."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(server.server_port)
        logger.info("metrics on http://%s:%d/metrics", host, bound)
        return bound
