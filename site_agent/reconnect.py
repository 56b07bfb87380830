"""How long the agent waits before dialling the coordinator again (pure decisions, no I/O)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["ReconnectBackoff"]


@dataclass
class ReconnectBackoff:
    """Capped exponential backoff that starts over, fast, after every good session.

    A coordinator restart drops every site at once. Right after a good session the first wait
    is about `first_retry` and, for `recovery_window` seconds, no wait exceeds `recovery_cap`,
    so sites are back within that cap of the coordinator's return; each of those waits is
    jittered (between half and all of it) so that hundreds of sites do not dial in lockstep.
    A coordinator that stays away is then polled ever more slowly, up to `maximum`.

    With `from_start`, the agent's own start opens such a window too: sites started together
    with their coordinator (compose's `service_started`, a host booting every service at once)
    find it within `recovery_cap` of it serving, not after a wait grown meanwhile.
    """

    initial: float = 0.5
    maximum: float = 30.0
    first_retry: float = 0.2
    recovery_cap: float = 1.0
    recovery_window: float = 60.0
    clock: Callable[[], float] = time.monotonic
    jitter: Callable[[], float] = random.random  # a fraction in [0, 1)
    from_start: bool = False
    next_delay: float = field(init=False)
    _lost_at: float | None = field(init=False, default=None)
    _in_session: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.next_delay = self.initial
        if self.from_start:
            self._lost_at = self.clock()

    def connected(self) -> None:
        """A session got through (hello answered): the next wait starts from `initial`."""
        self.next_delay = self.initial
        self._in_session = True

    def failed(self) -> float:
        """A connection failed or ended: returns how long to wait, and grows the next wait."""
        if self._in_session:
            self._in_session = False
            self._lost_at = self.clock()
            self.next_delay = min(self.first_retry, self.maximum)
        recovering = (
            self._lost_at is not None and self.clock() - self._lost_at < self.recovery_window
        )
        delay = self.next_delay
        cap = self.maximum
        if recovering:
            cap = min(cap, max(self.recovery_cap, self.first_retry))
        self.next_delay = min(delay * 2, cap)
        if recovering:
            return delay * (0.5 + 0.5 * self.jitter())
        return delay
