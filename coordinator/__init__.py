"""The central service: gRPC servicer, run engine, ledger, checkpoint store, `baton` CLI.

It never imports torch: adapters are bytes it validates with `protocols.checkpoint`.
"""

from coordinator.engine import RunEngine
from coordinator.plan import PlanError, RunPlan, load_plan, parse_plan
from coordinator.server import Coordinator, build_server
from coordinator.settings import CoordinatorSettings

__all__ = [
    "Coordinator",
    "CoordinatorSettings",
    "PlanError",
    "RunEngine",
    "RunPlan",
    "build_server",
    "load_plan",
    "parse_plan",
]
