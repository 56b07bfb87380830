"""The run engine: leases hops to connected sites, accepts their uploads and commits results.

`RunEngine` is the facade the servicer, the dashboard and the server hold; each module below it
has one job (sessions, tasks, leases, hops, controls, uploads, evaluations, statistics_rounds,
run_views: the admin's view of runs).
"""

from __future__ import annotations

from coordinator.engine.leases import HopProgress
from coordinator.engine.run_engine import RunEngine
from coordinator.engine.sessions import SiteSession
from coordinator.engine.tasks import approval_bundle, statistics_bundle

__all__ = ["HopProgress", "RunEngine", "SiteSession", "approval_bundle", "statistics_bundle"]
