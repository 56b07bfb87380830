"""The commit transaction's statements on the driver's cursor (`coordinator.ledger._cursor`):
what they send and read is what SQLAlchemy's execution sends and reads, the engine's cursor
events still see them, a driver error is raised as SQLAlchemy raises it, and a hand back's
transaction runs none of them through an execution context (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import sqlite3
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session
from sqlalchemy.sql.compiler import SQLCompiler

from coordinator.ledger import HopRow, Ledger, _cursor
from coordinator.ledger._chain import _event_insert, _insert_statement, _locked_read
from coordinator.ledger.models import EventRow
from tests.coordinator_tests.test_commit_statements import _hand_back, _leased_run


def _raw_hop(ledger: Ledger, hop_id: str) -> tuple[Any, ...]:
    """The hop's columns as the database holds them, each as text (JSON its stored text)."""
    table = HopRow.__table__
    columns = [sa.cast(c, sa.Text) for c in table.c]
    with ledger.engine.connect() as connection:
        return tuple(connection.execute(sa.select(*columns).where(table.c.id == hop_id)).one())


def _hop_values(hop_id: str, run_id: str, index: int = 9) -> dict[str, Any]:
    """Every column of a hop row: a JSON None (JSON null, not SQL NULL), an aware datetime."""
    return {
        "id": hop_id, "run_id": run_id, "index": index, "site": "site-x", "status": "leased",
        "hyperparameters": {"steps": 3, "rate": 0.5, "note": "é"}, "metrics": None,
        "lease_token": None, "attempts": 1, "input_sha256": None, "output_sha256": None,
        "leased_at": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "committed_at": None,
        "train_started_at_ns": 2**40, "train_finished_at_ns": None, "error_code": None,
        "error": None, "ledger_seq": 7,
    }  # fmt: skip


def test_a_row_written_and_read_on_the_cursor_is_the_row_sqlalchemys_execution_makes(
    ledger: Ledger,
) -> None:
    """Each parameter goes through its type's bind processor (None too: a JSON column's None
    is JSON null), each column read through its result processor: the stored texts and the
    values read back are those `Connection.execute` gives."""
    run_id, _ids = _leased_run(ledger, 1)
    insert = _insert_statement(HopRow)
    through_execute, on_cursor = uuid.uuid4().hex, uuid.uuid4().hex
    with ledger.engine.begin() as connection:
        connection.execute(insert, _hop_values(through_execute, run_id))
        values = _hop_values(on_cursor, run_id, 10)
        _cursor.write(connection, insert, values, keys=tuple(values))
    stored, expected = _raw_hop(ledger, on_cursor), _raw_hop(ledger, through_execute)
    assert (stored[0], stored[2]) == (on_cursor, "10")  # id and index: their own
    assert stored[1] == expected[1] and stored[3:] == expected[3:]
    assert '"note": "\\u00e9"' in stored[4] and stored[11] == "null"  # JSON text, JSON null
    read = _locked_read(HopRow)
    with ledger.engine.begin() as connection:
        executed = tuple(connection.execute(read.query, {"key_id": through_execute}).one())
        [found] = _cursor.read(connection, read.query, {"key_id": through_execute})
    assert tuple(found) == executed
    assert [type(v) for v in found] == [type(v) for v in executed]


def test_cursor_statements_are_seen_by_the_engines_cursor_events(ledger: Ledger) -> None:
    run_id, _ids = _leased_run(ledger, 1)
    seen: list[tuple[str, object]] = []

    def note(_conn: object, _cursor: object, statement: str, params: object, *_: object) -> None:
        seen.append((statement.split()[0], params))

    event.listen(ledger.engine, "before_cursor_execute", note)
    try:
        with ledger.engine.begin() as connection:
            values = _hop_values(uuid.uuid4().hex, run_id)
            _cursor.write(connection, _insert_statement(HopRow), values, keys=tuple(values))
    finally:
        event.remove(ledger.engine, "before_cursor_execute", note)
    assert [kind for kind, _ in seen] == ["INSERT"]


def test_a_driver_error_on_the_cursor_is_raised_as_sqlalchemy_raises_it(ledger: Ledger) -> None:
    """A duplicate event hash (unique): `IntegrityError`, as through `Connection.execute` (so a
    full disk is an `OperationalError`, a storage fault, here as anywhere); the ledger is as
    it was."""
    run_id, _ids = _leased_run(ledger, 1)
    head = ledger.events(run_id)[-1]
    values: dict[str, Any] = {
        "at": head.at, "kind": "test.duplicate", "run_id": run_id, "hop_id": None,
        "site": None, "payload": {}, "prev_hash": head.hash, "hash": head.hash,
    }  # fmt: skip
    with pytest.raises(sa.exc.IntegrityError), ledger.engine.begin() as connection:
        _cursor.write(connection, _event_insert(), values, keys=tuple(values))
    assert ledger.events(run_id)[-1].seq == head.seq
    assert ledger.verify().ok


def test_a_hand_backs_transaction_runs_no_statement_through_sqlalchemys_execution(
    ledger: Ledger,
) -> None:
    """Every statement of the commit transaction (and the bundle look-up, `stored_sizes`) is
    sent on the driver's cursor: none has an execution context (SQLAlchemy's execution builds
    one per statement: a cache key, a compiled-cache look-up, a result object)."""
    run_id, ids = _leased_run(ledger, 4)
    _hand_back(ledger, run_id, ids, 0)
    contexts: list[tuple[str, object]] = []

    def note(_conn: object, _cursor: object, statement: str, _params: object,
             context: object, _many: bool) -> None:  # fmt: skip
        contexts.append((" ".join(statement.split())[:40], context))

    event.listen(ledger.engine, "before_cursor_execute", note)
    try:
        ledger.stored_sizes(ids[1])
        _hand_back(ledger, run_id, ids, 1)
    finally:
        event.remove(ledger.engine, "before_cursor_execute", note)
    assert len(contexts) >= 14
    assert [statement for statement, context in contexts if context is not None] == []
    assert ledger.verify().ok


def test_a_transaction_looks_its_connection_up_in_the_session_once(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`LedgerCore.transaction` keeps the connection it opened (`connection_of`): the session's
    own look-up is not made again for each statement."""
    run_id, ids = _leased_run(ledger, 3)
    looked_up: list[Session] = []
    connection = Session.connection

    def counted(self: Session, *args: Any, **kwargs: Any) -> sa.Connection:
        looked_up.append(self)
        return connection(self, *args, **kwargs)

    monkeypatch.setattr(Session, "connection", counted)
    _hand_back(ledger, run_id, ids, 0)
    assert len(looked_up) == 1
    assert ledger.verify().ok
    assert [e.kind for e in ledger.events(run_id)][-4:] == [
        "checkpoint.stored", "hop.uploaded", "hop.committed", "hop.leased"
    ]  # fmt: skip


def test_a_statement_cursor_cannot_reproduce_goes_through_execute(ledger: Ledger) -> None:
    """An expanding IN is not sent on the cursor (its SQL depends on the parameters)."""
    events = EventRow.__table__.c
    query = sa.select(events.seq).where(events.seq.in_(sa.bindparam("seqs", expanding=True)))
    run_id, _ids = _leased_run(ledger, 1)
    seqs = [e.seq for e in ledger.events(run_id)]
    with ledger.engine.connect() as connection:
        found = _cursor.read(connection, query, {"seqs": seqs})
    assert sorted(row[0] for row in found) == seqs


def test_a_json_parameter_sent_as_its_text_is_stored_as_execute_stores_its_value(
    ledger: Ledger,
) -> None:
    """`json_text`: the payload encoded once, by the serializer the dialect's JSON type uses,
    and sent as that text: the event stored is the one `Connection.execute` stores."""
    run_id, _ids = _leased_run(ledger, 1)
    payload = {"z": [1, 2.5, None], "a": "é", "state_rows": [{"table": "hops", "key": "k"}]}
    seqs = []
    with ledger.engine.begin() as connection:
        for i, value in enumerate((payload, _cursor.json_text(connection.dialect, payload))):
            values = {"at": f"t{i}", "kind": "test.json", "run_id": run_id, "hop_id": None,
                      "site": None, "payload": value, "prev_hash": "p",
                      "hash": f"h{i}"}  # fmt: skip
            if i == 0:
                inserted = connection.execute(_event_insert(), values).inserted_primary_key
                assert inserted is not None
                seqs.append(inserted[0])
            else:
                seqs.append(_cursor.write(connection, _event_insert(), values, keys=tuple(values)))
    events = EventRow.__table__.c
    query = sa.select(sa.cast(events.payload, sa.Text)).where(events.seq.in_(seqs))
    with ledger.engine.connect() as connection:
        texts = connection.execute(query).scalars().all()
    assert len(texts) == 2 and texts[0] == texts[1] == json.dumps(payload)


def test_a_write_outside_a_transaction_goes_through_execute_and_returns_the_new_key(
    ledger: Ledger,
) -> None:
    """A connection with no transaction open gets SQLAlchemy's own (autobegin), and the
    event's payload given as its text is written as its value."""
    run_id, _ids = _leased_run(ledger, 1)
    payload = {"b": 1, "a": [None]}
    with ledger.engine.connect() as connection:
        assert not connection.in_transaction()
        values = {"at": "t", "kind": "test.outside", "run_id": run_id, "hop_id": None,
                  "site": None, "payload": _cursor.json_text(connection.dialect, payload),
                  "prev_hash": "p", "hash": "h-outside"}  # fmt: skip
        seq = _cursor.write(connection, _event_insert(), values, keys=tuple(values))
        connection.commit()
    events = EventRow.__table__.c
    query = sa.select(sa.cast(events.payload, sa.Text)).where(events.seq == seq)
    with ledger.engine.connect() as connection:
        assert connection.execute(query).scalar_one() == json.dumps(payload)


def test_without_the_sqlalchemy_internals_it_uses_every_statement_goes_through_execute(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An SQLAlchemy without `Connection._cursor_execute` (or the types' cached processors) is
    still a ledger: each statement goes through SQLAlchemy's execution, the events are the same
    and the chain verifies."""
    monkeypatch.setattr(_cursor, "SQLALCHEMY_INTERNALS", False)
    _cursor._prepared.cache_clear()
    try:
        run_id, ids = _leased_run(ledger, 3)
        contexts: list[object] = []

        def note(_conn: object, _cur: object, _statement: str, _params: object,
                 context: object, _many: bool) -> None:  # fmt: skip
            contexts.append(context)

        event.listen(ledger.engine, "before_cursor_execute", note)
        try:
            _hand_back(ledger, run_id, ids, 0)
        finally:
            event.remove(ledger.engine, "before_cursor_execute", note)
        assert len(contexts) >= 14
        assert all(context is not None for context in contexts)
        assert ledger.verify().ok
        assert [e.kind for e in ledger.events(run_id)][-4:] == [
            "checkpoint.stored", "hop.uploaded", "hop.committed", "hop.leased"
        ]  # fmt: skip
    finally:
        _cursor._prepared.cache_clear()


def test_a_compiler_without_an_attribute_it_reads_sends_the_statement_through_execute(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compiled statement lacking an attribute `_prepared` reads (another SQLAlchemy) is not
    sent on the cursor: the statement still runs, through `Connection.execute`."""

    bare = object.__new__(SQLCompiler)  # a compiler whose attributes were never set

    monkeypatch.setattr(_cursor, "_compile", lambda *_args: bare)
    _cursor._prepared.cache_clear()
    try:
        assert _cursor._prepared(sa.select(sa.literal(1)), ledger.engine.dialect, None) is None
    finally:
        _cursor._prepared.cache_clear()


def test_a_driver_error_while_fetching_the_rows_is_raised_as_sqlalchemy_raises_it(
    ledger: Ledger,
) -> None:
    """SQLite runs a SELECT as its rows are fetched: an error on a later row (a full disk, a
    damaged page; here a function failing on the second row) comes from the driver's fetch,
    and is raised as SQLAlchemy's result raises it, with the driver's error inside."""
    if ledger.engine.dialect.name != "sqlite":
        pytest.skip("a SQLite function failing on a row")
    run_id, _ids = _leased_run(ledger, 1)
    seen: list[int] = []

    def fails_on_the_second_row(seq: int) -> int:
        seen.append(seq)
        if len(seen) > 1:
            raise ValueError("a later row")
        return seq

    events = EventRow.__table__.c
    query = sa.select(sa.func.fails_later(events.seq)).where(events.run_id == sa.bindparam("r"))
    with ledger.engine.connect() as connection:
        driver = connection.connection.driver_connection
        assert driver is not None
        driver.create_function("fails_later", 1, fails_on_the_second_row)
        with pytest.raises(sa.exc.OperationalError) as raised:
            _cursor.read(connection, query, {"r": run_id})
    assert len(seen) == 2 and isinstance(raised.value.orig, sqlite3.OperationalError)


def test_a_statements_result_processors_are_found_once_from_its_first_rows(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As SQLAlchemy keeps a compiled statement's result metadata: the cursor's description
    (costly with psycopg) is read for the first rows only, and every read decodes alike."""
    run_id, _ids = _leased_run(ledger, 2)
    looked_up: list[tuple[Any, ...]] = []
    result_processors = _cursor._result_processors

    def counted(prepared: Any, dialect: sa.Dialect, codes: tuple[Any, ...]) -> Any:
        looked_up.append(codes)
        return result_processors(prepared, dialect, codes)

    monkeypatch.setattr(_cursor, "_result_processors", counted)
    hops = HopRow.__table__.c
    query = sa.select(hops.id, hops.leased_at, hops.hyperparameters).where(
        hops.run_id == sa.bindparam("r")
    )
    with ledger.engine.connect() as connection:
        executed = sorted(tuple(row) for row in connection.execute(query, {"r": run_id}))
        assert _cursor.read(connection, query, {"r": "none such"}) == []  # no rows: not looked up
        reads = [sorted(_cursor.read(connection, query, {"r": run_id})) for _ in range(3)]
    assert len(looked_up) == 1
    assert reads == [executed] * 3
    assert [type(v) for v in reads[0][0]] == [type(v) for v in executed[0]]
