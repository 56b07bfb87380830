"""Two writers moving one state row at once: the compare-and-set of a transition holds on SQLite
and PostgreSQL, whether the other writer is a thread of this process or a process of its own."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.ledger import HopRow, Ledger, TransitionRefused

ROOT = Path(__file__).resolve().parents[2]
# The other writer: a process that leases the hop (argv: url, hop id) and says how it went.
_LEASE = """
import sys
from coordinator.ledger import Ledger, TransitionRefused
ledger = Ledger(sys.argv[1])
print("ready", flush=True)
try:
    ledger.transition_hop(sys.argv[2], expected=("pending",), status="leased",
                          event="hop.leased", lease_token="other")
except TransitionRefused:
    print("refused")
else:
    print("leased")
"""
# How long the first writer, having read the hop, waits for the other to finish. Long enough
# for an unlocked writer to read, write and commit; a locked one waits it out (no verdict is
# timed: without the lock both writers win, whenever the first resumes).
_HOLD_SECONDS = 3.0


def _pending_hop(ledger: Ledger) -> str:
    hop = HopRow(id=uuid.uuid4().hex, index=0, site="site-a", hyperparameters={},
                 status="pending", metrics={})  # fmt: skip
    ledger.create_run(uuid.uuid4().hex, "race", {"task": "t"}, [hop], None)
    return hop.id


def _in_a_thread(ledger: Ledger, hop_id: str) -> tuple[Callable[[], None], Callable[[], str]]:
    """The other writer as a thread of this process (the same `Ledger`, its own connection)."""
    outcome: list[str] = []

    def lease() -> None:
        try:
            ledger.transition_hop(hop_id, expected=("pending",), status="leased",
                                  event="hop.leased", lease_token="other")  # fmt: skip
            outcome.append("leased")
        except TransitionRefused:
            outcome.append("refused")

    thread = threading.Thread(target=lease)

    def start() -> None:
        thread.start()
        thread.join(_HOLD_SECONDS)

    def result() -> str:
        thread.join()
        return outcome[0]

    return start, result


def _in_a_process(ledger: Ledger, hop_id: str) -> tuple[Callable[[], None], Callable[[], str]]:
    """The other writer as a process of its own (a CLI command beside `serve`)."""
    process: list[subprocess.Popen[str]] = []

    def start() -> None:
        child = subprocess.Popen(
            [sys.executable, "-c", _LEASE, ledger.url, hop_id],
            stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        process.append(child)
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        with contextlib.suppress(subprocess.TimeoutExpired):  # waiting for this one's lock
            child.wait(_HOLD_SECONDS)

    def result() -> str:
        out, _ = process[0].communicate(timeout=60)
        assert process[0].returncode == 0
        return out.strip()

    return start, result


@pytest.mark.parametrize("other", [_in_a_thread, _in_a_process], ids=["thread", "process"])
def test_two_writers_leasing_one_pending_hop_one_wins_the_other_is_refused(
    ledger: Ledger,
    other: Callable[[Ledger, str], tuple[Callable[[], None], Callable[[], str]]],
) -> None:
    hop_id = _pending_hop(ledger)
    start_other, other_result = other(ledger, hop_id)

    def attempts(hop: HopRow) -> int:
        # This writer has read the hop as pending: the other writer tries the same lease now.
        start_other()
        return hop.attempts + 1

    try:
        ledger.transition_hop(
            hop_id, expected=("pending",), status="leased", event="hop.leased",
            lease_token="first", attempts=attempts,
        )  # fmt: skip
        first = "leased"
    except TransitionRefused:
        first = "refused"
    assert sorted([first, other_result()]) == ["leased", "refused"]
    hop = ledger.hop(hop_id)
    assert hop is not None and hop.status == "leased"
    assert hop.lease_token == ("first" if first == "leased" else "other")
    leases = [e for e in ledger.events() if e.kind == "hop.leased"]
    assert len(leases) == 1
    assert ledger.verify().ok
