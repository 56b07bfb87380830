"""The run engine: leases hops to connected sites, accepts their uploads and commits results.

`RunEngine` is the facade the servicer, the dashboard and the server use.
"""

from __future__ import annotations

from coordinator.engine.run_engine import (
    HopProgress,
    RunEngine,
    SiteSession,
    approval_bundle,
    statistics_bundle,
)

__all__ = ["HopProgress", "RunEngine", "SiteSession", "approval_bundle", "statistics_bundle"]
