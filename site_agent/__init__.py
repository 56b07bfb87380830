"""The hospital service: dials out to the coordinator, trains and evaluates with torch + peft.

Importing this package does not import torch; the trainer loads it when the agent starts.
"""

from site_agent.agent import SiteAgent
from site_agent.settings import SiteSettings

__all__ = ["SiteAgent", "SiteSettings"]
