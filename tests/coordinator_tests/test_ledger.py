"""The ledger's event chain detects altered, deleted and inserted events."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import delete, event, select, update
from sqlalchemy.exc import OperationalError

from coordinator.ledger import EventRow, Ledger


@pytest.fixture
def ledger(database_url: str) -> Iterator[Ledger]:
    ledger = Ledger(database_url)
    ledger.migrate()
    for index in range(5):
        ledger.record_event("test.event", payload={"index": index})
    yield ledger
    ledger.close()


def test_untouched_chain_verifies(ledger: Ledger) -> None:
    assert ledger.verify_chain() is None
    events = ledger.events()
    assert [e.payload["index"] for e in events] == [0, 1, 2, 3, 4]
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(events))


def test_altered_event_is_named(ledger: Ledger) -> None:
    with ledger.transaction() as session:
        session.execute(update(EventRow).where(EventRow.seq == 3).values(payload={"index": 99}))
    broken = ledger.verify_chain()
    assert broken is not None and broken.seq == 3 and "altered" in broken.reason


def test_deleted_event_is_named(ledger: Ledger) -> None:
    with ledger.transaction() as session:
        session.execute(delete(EventRow).where(EventRow.seq == 2))
    broken = ledger.verify_chain()
    assert broken is not None and broken.seq == 3 and "deleted or inserted" in broken.reason


def test_migration_is_idempotent(ledger: Ledger) -> None:
    ledger.migrate()
    with ledger.transaction() as session:
        assert len(list(session.scalars(select(EventRow)))) == 5


def test_events_of_one_transaction_chain_to_each_other_reading_the_head_once(
    ledger: Ledger,
) -> None:
    reads: list[str] = []

    def note(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM events" in statement:
            reads.append(statement)

    event.listen(ledger.engine, "before_cursor_execute", note)
    try:
        with ledger.transaction() as session:
            for index in range(3):
                ledger.append_event(session, "test.batch", payload={"index": index})
    finally:
        event.remove(ledger.engine, "before_cursor_execute", note)
    assert len(reads) == 1  # the head before the first; then this transaction's own event
    assert ledger.verify_chain() is None
    events = ledger.events()
    assert [e.kind for e in events[-4:]] == ["test.event", *["test.batch"] * 3]
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(events))


def _without_waiting(dbapi_connection: object, _record: object) -> None:
    """A connection that is refused a lock another transaction holds instead of waiting."""
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        cursor.execute("PRAGMA busy_timeout=0")
    else:
        cursor.execute("SET lock_timeout = '100ms'")
        dbapi_connection.commit()  # type: ignore[attr-defined]
    cursor.close()


def test_an_appender_that_read_the_head_holds_the_chain_until_it_commits(ledger: Ledger) -> None:
    # A transaction whose first write is its event (`storage.fault` on the event loop) read
    # the head, on SQLite, outside any lock: the ledger writer's commit chained to the same
    # head meanwhile, and the chain forked.
    read, release = threading.Event(), threading.Event()
    appender = threading.Thread(target=ledger.record_event, args=("test.first",))

    def hold(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if threading.current_thread() is appender and "FROM events ORDER BY" in statement:
            read.set()
            release.wait(60)

    other = Ledger(ledger.url)  # another writer: a thread or a process of its own
    event.listen(other.engine, "connect", _without_waiting)
    event.listen(ledger.engine, "after_cursor_execute", hold)
    try:
        appender.start()
        assert read.wait(60), "the head was never read"
        try:
            other.record_event("test.second")
            refused = ""
        except OperationalError as exc:
            refused = str(exc.orig)
    finally:
        release.set()
        appender.join(60)
        event.remove(ledger.engine, "after_cursor_execute", hold)
    assert ledger.verify_chain() is None  # not two events after the same one
    assert "lock" in refused  # the other writer waits (here: is refused) until it commits
    other.record_event("test.second")
    other.close()
    assert [e.kind for e in ledger.events()[-3:]] == ["test.event", "test.first", "test.second"]
