"""The site agent's reconnect backoff: capped growth, a fresh start after a good session, and the
wait that ends once a closed coordinator port listens."""

from __future__ import annotations

import socket
import threading
import time

from site_agent.reconnect import ReconnectBackoff, wait_for_port


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failures_before_any_session_double_up_to_the_maximum() -> None:
    backoff = ReconnectBackoff(initial=0.5, maximum=4.0, clock=Clock())
    assert [backoff.failed() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_the_first_wait_after_a_good_session_is_the_first_retry_not_the_grown_delay() -> None:
    backoff = ReconnectBackoff(initial=0.5, maximum=30.0, first_retry=0.2, clock=Clock(),
                               jitter=lambda: 1.0)  # fmt: skip
    for _ in range(6):
        backoff.failed()
    assert backoff.next_delay == 30.0
    backoff.connected()
    assert backoff.failed() == 0.2


def test_from_start_a_coordinator_not_yet_serving_is_polled_under_the_recovery_cap() -> None:
    clock = Clock()
    backoff = ReconnectBackoff(initial=0.5, maximum=30.0, recovery_cap=1.0, recovery_window=60.0,
                               clock=clock, jitter=lambda: 1.0, from_start=True)  # fmt: skip
    waits = []
    for _ in range(5):
        waits.append(backoff.failed())
        clock.now += waits[-1]
    assert waits == [0.5, 1.0, 1.0, 1.0, 1.0]  # not 0.5, 1, 2, 4, 8: sites started with it
    clock.now = 61.0  # it stays away: poll ever more slowly again
    assert [backoff.failed() for _ in range(3)] == [1.0, 2.0, 4.0]


def test_right_after_a_lost_session_waits_start_fast_and_stay_under_the_recovery_cap() -> None:
    clock = Clock()
    backoff = ReconnectBackoff(initial=0.5, maximum=30.0, first_retry=0.2, recovery_cap=1.0,
                               recovery_window=60.0, clock=clock, jitter=lambda: 1.0)  # fmt: skip
    clock.now = 1000.0  # a long session: the window counts from the loss, not the connect
    backoff.connected()
    clock.now = 5000.0
    waits = []
    for _ in range(8):
        waits.append(backoff.failed())
        clock.now += waits[-1]
    assert waits == [0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0, 1.0]
    clock.now = 5000.0 + 61.0  # the coordinator stays away: poll ever more slowly again
    assert [backoff.failed() for _ in range(3)] == [1.0, 2.0, 4.0]


def test_waits_after_a_lost_session_are_spread_between_half_and_all_of_the_step() -> None:
    draws = iter([0.0, 0.5, 0.999])
    backoff = ReconnectBackoff(first_retry=0.2, recovery_cap=1.0, clock=Clock(),
                               jitter=lambda: next(draws))  # fmt: skip
    backoff.connected()
    assert [round(backoff.failed(), 3) for _ in range(3)] == [0.1, 0.3, 0.8]


def test_a_second_loss_in_the_window_starts_fast_again() -> None:
    clock = Clock()
    backoff = ReconnectBackoff(first_retry=0.2, recovery_cap=1.0, clock=clock, jitter=lambda: 1.0)
    backoff.connected()
    assert [backoff.failed() for _ in range(4)] == [0.2, 0.4, 0.8, 1.0]
    clock.now += 3.0
    backoff.connected()
    assert backoff.failed() == 0.2


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def test_a_wait_on_a_closed_port_ends_once_the_port_listens() -> None:
    port = _closed_port()
    stop = threading.Event()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def listen_soon() -> None:
        time.sleep(0.3)
        listener.bind(("127.0.0.1", port))
        listener.listen()

    opener = threading.Thread(target=listen_soon)
    opener.start()
    try:
        # 600 s: returning at all means it noticed the port open (not the whole wait).
        assert wait_for_port(f"localhost:{port}", 600.0, stop) is True
    finally:
        opener.join()
        listener.close()


def test_a_port_that_accepts_at_the_start_or_no_address_gets_the_whole_wait() -> None:
    stop = threading.Event()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        started = time.monotonic()
        assert wait_for_port(f"127.0.0.1:{listener.getsockname()[1]}", 0.3, stop) is False
        assert time.monotonic() - started >= 0.3  # the backoff still spaces the calls
    started = time.monotonic()
    assert wait_for_port("no-port-here", 0.2, stop) is False
    assert time.monotonic() - started >= 0.2


def test_a_wait_on_a_closed_port_ends_when_stopped() -> None:
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    assert wait_for_port(f"127.0.0.1:{_closed_port()}", 600.0, stop) is False
    assert stop.is_set()
