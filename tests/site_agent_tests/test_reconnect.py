"""The site agent's reconnect backoff: capped growth, and a fresh start after a good session."""

from __future__ import annotations

from site_agent.reconnect import ReconnectBackoff


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failures_before_any_session_double_up_to_the_maximum() -> None:
    backoff = ReconnectBackoff(initial=0.5, maximum=4.0, clock=Clock())
    assert [backoff.failed() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_the_first_wait_after_a_good_session_is_the_initial_delay() -> None:
    backoff = ReconnectBackoff(initial=0.5, maximum=30.0, clock=Clock())
    for _ in range(6):
        backoff.failed()
    assert backoff.next_delay == 30.0
    backoff.connected()
    assert backoff.failed() == 0.5


def test_right_after_a_lost_session_waits_stay_under_the_recovery_cap() -> None:
    clock = Clock()
    backoff = ReconnectBackoff(initial=0.5, maximum=30.0, recovery_cap=2.0,
                               recovery_window=60.0, clock=clock)  # fmt: skip
    clock.now = 1000.0  # a long session: the window counts from the loss, not the connect
    backoff.connected()
    clock.now = 5000.0
    waits = []
    for _ in range(8):
        waits.append(backoff.failed())
        clock.now += waits[-1]
    assert waits == [0.5, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]
    clock.now = 5000.0 + 61.0  # the coordinator stays away: poll ever more slowly again
    assert [backoff.failed() for _ in range(3)] == [2.0, 4.0, 8.0]
