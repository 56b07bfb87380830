"""The central service: gRPC servicer, run engine, ledger, checkpoint store, `baton` CLI.

It never imports torch: adapters are bytes it validates with `protocols.checkpoint`.

The names below are imported on first use (PEP 562), so that a process that runs one module of
the package (`python -m coordinator.ledger_apart`, the ledger migration child of every first
start) does not import the run engine and the servicer with it: 0.8 s of a 2.1 s child.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOMES = {
    "Coordinator": "coordinator.server",
    "CoordinatorSettings": "coordinator.settings",
    "PlanError": "coordinator.plan",
    "RunEngine": "coordinator.engine",
    "RunPlan": "coordinator.plan",
    "build_server": "coordinator.server",
    "load_plan": "coordinator.plan",
    "parse_plan": "coordinator.plan",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
    return getattr(import_module(home), name)
