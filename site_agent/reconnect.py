"""How long the agent waits before dialling the coordinator again, and the wait itself.

`ReconnectBackoff` decides (no I/O); `wait_for_port` waits, returning early when a coordinator
whose port was closed starts listening.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["PORT_POLL_SECONDS", "ReconnectBackoff", "wait_for_port"]

# How often a site waiting for a coordinator whose port is closed tries that port: one TCP
# connect (refused at once by the coordinator's host while it is down), about 0.1 ms of CPU.
PORT_POLL_SECONDS = 0.1


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


def wait_for_port(
    target: str,
    seconds: float,
    stop: threading.Event,
    *,
    poll: float = PORT_POLL_SECONDS,
    jitter: Callable[[], float] = random.random,
) -> bool:
    """Waits `seconds` (or until `stop`), returning early once the port of `target` (host:port)
    that refused a connection when the wait began accepts one: a site whose coordinator is not
    serving yet (or restarting) then dials within about `poll` of it serving, not after the rest
    of a backoff of up to a second. A port that accepts at the start (a coordinator up but
    failing the call, or a proxy in between), or a target that does not resolve, gets the whole
    wait: the backoff still spaces the calls. Polls are jittered (half to all of `poll`).

    Returns:
        Whether it returned early because the port opened.
    """
    deadline = time.monotonic() + seconds
    addresses = _resolved(target)
    if not addresses or _accepts(addresses, min(seconds, poll)):
        stop.wait(max(0.0, deadline - time.monotonic()))
        return False
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        stop.wait(min(left, poll * (0.5 + 0.5 * jitter())))
        if not stop.is_set() and time.monotonic() < deadline and _accepts(addresses, poll):
            return True
    return False


_Address = tuple[socket.AddressFamily, tuple[str, int]]


def _resolved(target: str) -> list[_Address]:
    """The addresses of `host:port` (`[v6]:port` too); none if it does not resolve."""
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return []
    try:
        found = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return list(dict.fromkeys(
        (family, (str(address[0]), int(address[1]))) for family, _, _, _, address in found
    ))  # fmt: skip


def _accepts(addresses: list[_Address], timeout: float) -> bool:
    """Whether one of `addresses` accepts a TCP connection (closed at once)."""
    for family, where in addresses:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(max(timeout, 0.01))
            try:
                probe.connect(where)
            except OSError:
                continue
        return True
    return False
