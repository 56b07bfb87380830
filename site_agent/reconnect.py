"""How long the agent waits before dialling the coordinator again (pure decisions, no I/O)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["ReconnectBackoff"]


@dataclass
class ReconnectBackoff:
    """Capped exponential backoff that starts over after every good session.

    A coordinator restart drops every site at once: right after a good session the delay stays
    at most `recovery_cap` for `recovery_window` seconds, so sites are back within that cap of
    the coordinator's return; a coordinator that stays away is then polled ever more slowly.
    """

    initial: float = 0.5
    maximum: float = 30.0
    recovery_cap: float = 2.0
    recovery_window: float = 60.0
    clock: Callable[[], float] = time.monotonic
    next_delay: float = field(init=False)
    _lost_at: float | None = field(init=False, default=None)
    _in_session: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.next_delay = self.initial

    def connected(self) -> None:
        """A session got through (hello answered): the next wait starts from `initial`."""
        self.next_delay = self.initial
        self._in_session = True

    def failed(self) -> float:
        """A connection failed or ended: returns how long to wait, and grows the next wait."""
        if self._in_session:
            self._in_session = False
            self._lost_at = self.clock()
        delay = self.next_delay
        cap = self.maximum
        if self._lost_at is not None and self.clock() - self._lost_at < self.recovery_window:
            cap = min(cap, max(self.recovery_cap, self.initial))
        self.next_delay = min(delay * 2, cap)
        return delay
