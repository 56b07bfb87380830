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
from sqlalchemy import event

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


def _blocked_at(ledger: Ledger, marks: Callable[[str], bool]) -> tuple[threading.Event, set[int]]:
    """An event set when one of the threads whose ids are put in the returned set sends a
    statement `marks` picks out (one that waits for the first writer's lock, or writes on a
    value read before it: either way, after this the first writer may commit)."""
    reached = threading.Event()
    threads: set[int] = set()

    def before(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if threading.get_ident() in threads and marks(" ".join(statement.split())):
            reached.set()

    event.listen(ledger.engine, "before_cursor_execute", before)
    return reached, threads


def test_two_first_commits_of_one_run_keep_the_base_model_the_first_one_pinned(
    ledger: Ledger,
) -> None:
    """The first commit of a run pins its base model; a second commit running meanwhile (a
    round's other member) reads the run under its lock, so it sees the pin and keeps it."""
    hops = [HopRow(id=uuid.uuid4().hex, index=i, site=f"site-{i}", hyperparameters={},
                   status="pending", metrics={}) for i in range(2)]  # fmt: skip
    run_id = uuid.uuid4().hex
    ledger.create_run(run_id, "pin", {"task": "t"}, hops, None)
    for hop in hops:
        ledger.lease_hop(hop.id, f"token-{hop.index}", None)

    def commit(index: int, base: str) -> None:
        ledger.commit_hop(hops[index].id, lease_token=f"token-{index}", output_sha256=base * 64,
                          metrics={}, train_started_at_ns=1, train_finished_at_ns=2,
                          base_model_sha256=base * 64)  # fmt: skip

    reached, threads = _blocked_at(
        ledger,
        lambda sql: (
            sql.startswith(("BEGIN IMMEDIATE", "UPDATE runs"))
            or (" FROM runs " in f"{sql} " and "FOR UPDATE" in sql)
        ),
    )

    def commit_second() -> None:
        threads.add(threading.get_ident())
        commit(1, "b")

    second = threading.Thread(target=commit_second)
    with ledger.transaction():
        commit(0, "a")  # pins "a", not committed yet
        second.start()
        assert reached.wait(30)
    second.join(30)
    assert not second.is_alive()
    assert ledger.run(run_id).base_model_sha256 == "a" * 64
    assert ledger.verify().ok
