"""The hospital service: dials out to the coordinator, trains and evaluates with torch + peft.

Importing this package does not import torch; the trainer loads it when the agent starts. Nor
does it import the agent: `baton-site`'s commands other than `serve` (data, cert, doctor,
--help) never need it, so its names load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from site_agent.agent import SiteAgent
    from site_agent.settings import SiteSettings

__all__ = ["SiteAgent", "SiteSettings"]

_HOMES = {"SiteAgent": "site_agent.agent", "SiteSettings": "site_agent.settings"}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
