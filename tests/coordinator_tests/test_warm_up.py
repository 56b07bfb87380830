"""The first hand back's warm-up (`coordinator.engine.warm_up`): it compiles what the commit
runs, leaves the ledger as it was, holds nothing a hand back waits on, and only logs a failure."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import MetaData, create_engine, event, select, text
from sqlalchemy.engine.default import CACHE_MISS
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import QueuePool, StaticPool

from coordinator.engine import warm_up
from coordinator.engine.warm_up import rehearse_hand_back, warm_first_hand_back
from coordinator.ledger import Base, Ledger, _cursor
from coordinator.server import Coordinator
from protocols.v1 import baton_pb2 as pb
from tests.conftest import LoopThread
from tests.coordinator_tests.conftest import ScriptedSite
from tests.coordinator_tests.test_commit_statements import _hand_back as _commit_transaction
from tests.coordinator_tests.test_commit_statements import _leased_run
from tests.coordinator_tests.test_hand_back import _bundle, _hand_back, site, task

__all__ = ["site", "task"]  # fixtures

STEPS = ["bundle checks", "worker threads", "ledger statements", "ledger commit"]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop serving on a thread of its own, as the coordinator's does."""
    thread = LoopThread()
    yield thread.loop
    thread.run(thread.loop.shutdown_default_executor())  # the threads the warm-up started
    thread.close()


def _contents(ledger: Ledger) -> dict[str, list[str]]:
    """Every row of every table, and where the sequences (SQLite: AUTOINCREMENT) stand."""
    tables = MetaData()
    tables.reflect(ledger.engine)
    with ledger.engine.connect() as connection:
        found = {
            name: sorted(repr(tuple(row)) for row in connection.execute(select(table)))
            for name, table in tables.tables.items()
        }
        if ledger.engine.dialect.name == "postgresql":  # SQLite's rowids: the rows above
            sequences = connection.execute(text(
                "SELECT sequencename, last_value FROM pg_sequences "
                "WHERE schemaname = current_schema()"
            ))  # fmt: skip
            found["(sequences)"] = sorted(repr(tuple(row)) for row in sequences)
    return found


def _compiled_anew(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the statements the ledger's engine compiles (not found in its cache), and
    those the ledger compiles for its driver-cursor statements (`_cursor`'s own cache)."""
    missed: list[str] = []
    compile_statement = _cursor._compile

    def compiled(statement: Any, dialect: Any, keys: Any) -> Any:
        found = compile_statement(statement, dialect, keys)
        if dialect is ledger.engine.dialect:
            missed.append(" ".join(found.string.split())[:60])
        return found

    monkeypatch.setattr(_cursor, "_compile", compiled)

    def note(_conn: object, _cursor: object, statement: str, _params: object,
             context: Any, _many: bool) -> None:  # fmt: skip
        if context is not None and context.cache_hit == CACHE_MISS:
            missed.append(" ".join(statement.split())[:60])

    event.listen(ledger.engine, "before_cursor_execute", note)
    return missed


def test_the_rehearsal_compiles_what_a_first_commit_runs_without_writing_the_ledger(
    ledger: Ledger, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id, ids = _leased_run(ledger, 4)
    before = _contents(ledger)
    warm_first_hand_back(ledger, loop)
    assert _contents(ledger) == before  # not a row written, no sequence moved
    assert ledger.verify().ok
    missed = _compiled_anew(ledger, monkeypatch)
    ledger.stored_run_mismatches(run_id, None)  # the hand back's early tamper check
    ledger.stored_sizes(ids[0])
    _commit_transaction(ledger, run_id, ids, 0)  # the run's first commit: its base model pinned
    assert missed == []  # the scratch tables' engine shares the ledger's dialect and cache
    assert ledger.verify().ok


def test_without_the_rehearsal_a_first_commit_compiles_its_statements(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counterpart: what the rehearsal takes off the first hand back."""
    run_id, ids = _leased_run(ledger, 4)
    missed = _compiled_anew(ledger, monkeypatch)
    _commit_transaction(ledger, run_id, ids, 0)
    assert any(statement.startswith("INSERT INTO checkpoints") for statement in missed)


def test_a_failing_warm_up_step_is_logged_and_the_others_run(
    ledger: Ledger, loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    _leased_run(ledger, 2)
    before = _contents(ledger)
    reached: list[str] = []

    def step(name: str) -> None:
        reached.append(name)
        if name in ("bundle checks", "ledger commit"):  # the latter inside the rehearsed commit
            raise RuntimeError(f"{name} broke")

    with caplog.at_level(logging.WARNING, logger=warm_up.__name__):
        warm_first_hand_back(ledger, loop, before_step=step)  # raises nothing
    assert reached == STEPS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "bundle checks skipped (RuntimeError: bundle checks broke)" in warnings[0]
    assert "ledger statements skipped (RuntimeError: ledger commit broke)" in warnings[1]
    assert _contents(ledger) == before and ledger.verify().ok


def test_a_hand_back_commits_while_the_warm_up_holds_its_rehearsed_commit_open(
    coordinator: Coordinator,
    loop_thread: LoopThread,
    sites: dict[str, ScriptedSite],
    site: ScriptedSite,
    task: pb.HopTask,
) -> None:
    """A hand back arriving in the middle of the warm-up waits on nothing the warm-up holds:
    held inside its rehearsed transaction (the scratch database's write lock taken, the
    statements it compiled in the shared cache), the warm-up lets a real hand back commit and
    lease the next hop before it goes on. The bound on a hand back meanwhile is then the
    interpreter shared with the warm-up's own CPU (tens of ms, once, at start-up)."""
    ledger = coordinator.engine.ledger
    inside, release = threading.Event(), threading.Event()
    order: list[str] = []

    def step(name: str) -> None:
        if name == "ledger commit":
            inside.set()
            release.wait(60)
            order.append("warm-up goes on")

    warming = threading.Thread(
        target=warm_first_hand_back,
        args=(ledger, loop_thread.loop),  # the coordinator's loop
        kwargs={"before_step": step},
    )
    warming.start()
    try:
        assert inside.wait(60)
        data = _bundle(site, task, 75_000)
        assert _hand_back(site, task, data, whole=True) == "committed"
        order.append("hand back committed")
        following = sites["site-b"].next_task()
        assert following.hop_id != task.hop_id
        order.append("next hop leased")
    finally:
        release.set()
        warming.join(60)
    assert order == ["hand back committed", "next hop leased", "warm-up goes on"]
    assert not warming.is_alive()
    assert ledger.verify().ok


def test_the_rehearsal_alone_needs_no_event_loop(ledger: Ledger) -> None:
    _leased_run(ledger, 2)
    before = _contents(ledger)
    rehearse_hand_back(ledger)
    assert _contents(ledger) == before and ledger.verify().ok


def test_the_warm_up_starts_the_threads_a_hand_back_runs_on(
    ledger: Ledger, loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop's default executor (a fresh loop: none yet) and the store's sync thread run
    before the first hand back, not started from the loop by it."""
    # The threads meet before the warm-up counts them started: on a loaded machine (CI), one
    # may take longer than the served coordinator's 0.1 s to run, which gives the step up.
    monkeypatch.setattr(warm_up, "THREAD_MEETING_SECONDS", 30.0)

    def running(prefix: str) -> int:
        return sum(thread.name.startswith(prefix) for thread in threading.enumerate())

    before = running("asyncio_")  # other loops' executors
    warm_first_hand_back(ledger, loop)
    assert running("asyncio_") - before >= warm_up.DEFAULT_EXECUTOR_THREADS
    assert running("store-sync") >= 1


def _postgresql_only(ledger: Ledger) -> None:
    if ledger.engine.dialect.name != "postgresql":
        pytest.skip(
            "temporary tables shadow a PostgreSQL ledger's; SQLite's rehearsal is in memory"
        )


def _temporary_tables(ledger: Ledger) -> int:
    """Temporary tables of any session in the ledger's database."""
    with ledger.engine.connect() as connection:
        return int(connection.execute(text(
            "SELECT count(*) FROM pg_class WHERE relpersistence = 't' AND relkind = 'r'"
        )).scalar_one())  # fmt: skip


def test_a_postgresql_rehearsal_leaves_no_temporary_table_nor_connection(ledger: Ledger) -> None:
    _postgresql_only(ledger)
    _leased_run(ledger, 2)
    pool = ledger.engine.pool
    assert isinstance(pool, QueuePool)
    connections = pool.checkedin(), pool.checkedout()
    rehearse_hand_back(ledger)
    assert _temporary_tables(ledger) == 0  # dropped, not left to its session's end
    assert (pool.checkedin(), pool.checkedout()) == connections  # none of the ledger's used


def test_a_postgresql_rehearsal_refuses_a_write_to_the_ledgers_tables(ledger: Ledger) -> None:
    """Past the shadowing, the rehearsal's transactions are READ ONLY: a statement reaching a
    ledger table or its sequence (not the temporary tables) is refused, not undone later."""
    _postgresql_only(ledger)
    _leased_run(ledger, 2)
    before = _contents(ledger)
    own = create_engine(ledger.engine.url, poolclass=StaticPool)
    try:
        with own.connect() as connection:
            warm_up._shadow_ledger_tables(connection)
            connection.commit()
            connection.execute(
                text(
                    "INSERT INTO events (at, kind, prev_hash, hash, payload) "
                    "VALUES ('t', 'k', 'p', 'h', '{}')"
                )
            )  # the temporary one
            schema = connection.execute(text("SELECT current_schema()")).scalar_one()
            for statement in (
                f"INSERT INTO {schema}.events (at, kind, prev_hash, hash, payload) "
                "VALUES ('t', 'k', 'p', 'h', '{}')",
                f"SELECT nextval('{schema}.events_seq_seq')",
                f"SELECT * FROM {schema}.hops FOR UPDATE",
            ):
                connection.rollback()
                with pytest.raises(DBAPIError, match="read-only transaction"):
                    connection.execute(text(statement))
    finally:
        own.dispose()
    assert _contents(ledger) == before and ledger.verify().ok


def test_a_postgresql_rehearsal_is_skipped_where_temporary_tables_do_not_shadow(
    ledger: Ledger,
) -> None:
    """A search_path naming pg_temp after the ledger's schema: unqualified names would reach
    the ledger's tables; nothing is rehearsed."""
    _postgresql_only(ledger)
    _leased_run(ledger, 2)
    before = _contents(ledger)
    url = ledger.engine.url.update_query_dict({"options": "-csearch_path=public,pg_temp"})
    moved = Ledger(url.render_as_string(hide_password=False))
    try:
        with pytest.raises(RuntimeError, match=r"do not shadow the ledger.s [a-z_]*"):
            rehearse_hand_back(moved)
    finally:
        moved.close()
    assert _contents(ledger) == before and ledger.verify().ok


def test_a_postgresql_rehearsal_held_in_its_commit_blocks_no_hand_back_nor_migration(
    ledger: Ledger,
) -> None:
    """Held inside its rehearsed commit transaction (events appended, rows locked), the
    rehearsal holds neither the chain's advisory lock nor any lock on a ledger table: a hand
    back commits, and a migration's ACCESS EXCLUSIVE lock is granted at once."""
    _postgresql_only(ledger)
    run_id, ids = _leased_run(ledger, 4)
    inside, release = threading.Event(), threading.Event()

    def step(name: str) -> None:
        if name == "ledger commit":
            inside.set()
            release.wait(60)

    rehearsal = threading.Thread(target=rehearse_hand_back, args=(ledger, step))
    rehearsal.start()
    try:
        assert inside.wait(60)
        committing = threading.Thread(target=_commit_transaction, args=(ledger, run_id, ids, 0))
        committing.start()
        committing.join(30)
        assert not committing.is_alive()  # committed while the rehearsal was held
        tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
        with ledger.engine.connect() as connection:
            connection.execute(text(f"LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE NOWAIT"))
            connection.rollback()
    finally:
        release.set()
        rehearsal.join(60)
    assert not rehearsal.is_alive()
    assert ledger.verify().ok


def test_after_the_warm_up_a_served_first_hand_back_compiles_no_statement(
    coordinator: Coordinator,
    loop_thread: LoopThread,
    sites: dict[str, ScriptedSite],
    site: ScriptedSite,
    task: pb.HopTask,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """End to end, over gRPC: the coordinator's first hand back (early tamper check, bundle
    look-up, the commit's transaction, the next lease, the tamper check after it) finds every
    statement it runs in the ledger's compiled cache, on SQLite and on PostgreSQL."""
    ledger = coordinator.engine.ledger
    # A watchdog pass first (every 0.5 s from the start, long before a real first hand back):
    # its own statements, not the hand back's, are then not compiled during the one here.
    loop_thread.run(coordinator.engine.check_deadlines())
    warm_first_hand_back(ledger, loop_thread.loop)
    missed = _compiled_anew(ledger, monkeypatch)
    data = _bundle(site, task, 75_000)
    assert _hand_back(site, task, data, whole=True) == "committed"
    assert sites["site-b"].next_task().hop_id != task.hop_id
    assert missed == []
