"""Takes a cold coordinator's first-call costs off its first hand back, once, after start-up.

A process's first hand back compiles the SQL of the commit's transaction and of the run's
tamper check (SQLAlchemy caches each statement's compiled form per engine), and starts the
worker threads its steps run on (a thread started from the event loop holds the loop until it
runs). `warm_first_hand_back` does both ahead, on a worker thread once the first sites' hellos
are over (`coordinator.server.settle_when_quiet`), without changing the ledger: the statements
run on scratch tables (`rehearse_hand_back`) through an engine that shares the ledger's dialect
and compiled statement cache, so what it compiles is what the ledger's first commit looks up.
An SQLite ledger's scratch tables are in an in-memory database; a PostgreSQL ledger's are
temporary tables of one connection of its own, shadowing the ledger's by name, in READ ONLY
transactions (a write to a ledger table or sequence is refused there). No lock of the ledger is
taken (not the chain's advisory lock: the rehearsal's events take one of their own) and no
sequence value consumed: a hand back arriving meanwhile shares the interpreter with it and
waits on nothing it holds. A step that fails is logged and skipped; the first hand back then
pays for it, as before.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Executor

from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool
from sqlalchemy.schema import CreateTable

from coordinator.engine import uploads
from coordinator.ledger import Base, HopRow, Ledger
from protocols.checkpoint import warm_up as warm_bundle_checks

__all__ = ["rehearse_hand_back", "start_worker_threads", "warm_first_hand_back"]

logger = logging.getLogger(__name__)

# Threads of the event loop's default executor a hand back uses at once, started ahead: a
# bundle in one message is staged in the store on one (its checks run on the loop); a streamed
# one is fsynced on one while it is inspected on another. At most the executor's smallest size
# (5: `min(32, cpus + 4)`), so the threads never wait for each other.
DEFAULT_EXECUTOR_THREADS = 2
# How long the threads being started wait for each other: a thread starts in well under a
# millisecond; a busy executor (a hand back's work in it already) gives up the warm-up instead.
THREAD_MEETING_SECONDS = 0.1
# The advisory lock a rehearsal's events take on PostgreSQL instead of the chain's (a real hand
# back appending meanwhile waits on nothing the rehearsal holds): same statement, another key.
REHEARSAL_LOCK = 0x6261746F6E7775  # "batonwu"
# The ledger's tables whose unqualified name does not resolve to this session's temporary one.
_UNSHADOWED = text(
    "SELECT name FROM unnest(CAST(:names AS text[])) AS name WHERE NOT EXISTS (SELECT 1 "
    "FROM pg_class c WHERE c.oid = to_regclass(quote_ident(name)) "
    "AND c.relnamespace = pg_my_temp_schema())"
)


def _nothing(_step: str) -> None:
    pass


def warm_first_hand_back(
    ledger: Ledger,
    loop: asyncio.AbstractEventLoop,
    *,
    before_step: Callable[[str], None] = _nothing,
) -> None:
    """Runs the first-call work of a hand back ahead (on a worker thread: it blocks).

    Args:
        ledger: The coordinator's ledger: its dialect and statement cache are warmed, its
            database is never read nor written.
        loop: The event loop whose default executor's threads are started.
        before_step: Called with each step's name before it runs (a test holds a step there).
    """
    steps: list[tuple[str, Callable[[], object]]] = [
        ("bundle checks", warm_bundle_checks),
        ("worker threads", lambda: _start_loop_threads(loop)),
        ("ledger statements", lambda: rehearse_hand_back(ledger, before_step)),
    ]
    for name, step in steps:
        try:
            before_step(name)
            step()
        except Exception as exc:  # a cold first hand back, not a failed coordinator
            logger.warning(
                "warm-up of the first hand back: %s skipped (%s: %s); the first hand back "
                "pays that first-call cost",
                name,
                type(exc).__name__,
                " ".join(str(exc).split())[:200],
            )


def _start_loop_threads(loop: asyncio.AbstractEventLoop) -> None:
    """The default executor's threads and the store's sync thread, started ahead."""

    async def default_executor() -> None:
        meeting = threading.Barrier(DEFAULT_EXECUTOR_THREADS, timeout=THREAD_MEETING_SECONDS)
        await asyncio.gather(
            *(loop.run_in_executor(None, meeting.wait) for _ in range(DEFAULT_EXECUTOR_THREADS))
        )

    asyncio.run_coroutine_threadsafe(default_executor(), loop).result(timeout=5)
    start_worker_threads(uploads._SYNC_THREADS, 1)  # a hand back's bundle made durable


def start_worker_threads(executor: Executor, count: int) -> None:
    """Has `executor` run `count` threads (if it has fewer): `count` tasks that wait for each
    other, each then on a thread of its own. `count` must not exceed the executor's size.

    Raises:
        threading.BrokenBarrierError: The tasks did not all start within
            THREAD_MEETING_SECONDS (the executor was busy).
    """
    if count == 1:
        executor.submit(lambda: None).result(timeout=5)
        return
    meeting = threading.Barrier(count, timeout=THREAD_MEETING_SECONDS)
    for started in [executor.submit(meeting.wait) for _ in range(count)]:
        started.result(timeout=5)


def rehearse_hand_back(ledger: Ledger, before_step: Callable[[str], None] = _nothing) -> None:
    """A run's first lease, its tamper checks and its first hand back's commit transaction, on
    scratch tables: the statements `ledger`'s first hand back executes, compiled into its
    statement cache (SQLite and PostgreSQL ledgers; another dialect warms the ORM code only).

    The scratch engine is a copy of the ledger's engine with a pool of its own: same dialect,
    same compiled cache, none of the ledger's connections. On SQLite its one connection is to
    an in-memory database; on PostgreSQL to the ledger's database, where temporary tables
    shadow the ledger's (`_shadow_ledger_tables`). `before_step("ledger commit")` is called
    inside the rehearsed commit's transaction.
    """
    dialect = ledger.engine.dialect.name
    if dialect == "postgresql":
        _rehearse_on_temporary_tables(ledger, before_step)
        return
    memory = create_engine("sqlite://", poolclass=StaticPool)
    try:
        if dialect == "sqlite":
            engine = copy.copy(ledger.engine)  # the dialect and statement cache, shared
            engine.pool = memory.pool
        else:
            engine = memory
        Base.metadata.create_all(engine)
        scratch = Ledger("sqlite://", engine=engine)
        _rehearse(scratch, before_step)
    finally:
        memory.dispose()


def _rehearse_on_temporary_tables(ledger: Ledger, before_step: Callable[[str], None]) -> None:
    """The rehearsal on one new connection to a PostgreSQL ledger's database whose temporary
    tables shadow the ledger's (`_shadow_ledger_tables`), through the ledger's dialect and
    statement cache: the statements are the ledger's own (unqualified names, no schema
    translation: the same cache keys); PostgreSQL resolves their names to the temporary tables.

    The ledger's rows, sequence (events.seq) and locks are untouched: every rehearsed
    transaction is READ ONLY (PostgreSQL refuses a write to a permanent table, a lock of its
    rows or a permanent sequence's nextval there; temporary ones it allows), its events take an
    advisory lock of their own (`REHEARSAL_LOCK`, not the chain's), and the temporary tables
    are dropped before the connection closes (closing would drop them too, moments later).
    """
    own = create_engine(ledger.engine.url, poolclass=StaticPool)  # one connection, closed below
    engine = copy.copy(ledger.engine)  # the dialect and statement cache, shared
    engine.pool = own.pool
    try:
        with engine.connect() as connection:
            _shadow_ledger_tables(connection)
            connection.commit()
        scratch = Ledger(ledger.url, engine=engine)
        scratch.chain_lock_key = REHEARSAL_LOCK
        _rehearse(scratch, before_step)
    finally:
        try:
            with engine.connect() as connection:
                connection.exec_driver_sql("SET TRANSACTION READ WRITE")
                connection.exec_driver_sql("DISCARD TEMP")
                connection.commit()
        except DBAPIError:  # a broken connection: its tables go when its session ends
            pass
        own.dispose()


def _shadow_ledger_tables(connection: Connection) -> None:
    """Creates a temporary table for each of the ledger's tables (same name, columns and
    constraints; no other index), checks that each unqualified name now resolves to it, then
    makes every later transaction of the connection READ ONLY.

    The tables are made from the models, not `LIKE` the ledger's: no lock on a ledger table,
    and `events.seq` gets a temporary sequence of its own (`LIKE ... INCLUDING DEFAULTS` would
    copy the ledger's `nextval` default and consume the ledger's sequence).

    Raises:
        RuntimeError: A name resolves to another table (a search_path naming pg_temp after
            the ledger's schema): nothing is rehearsed.
    """
    # Its commits make temporary objects only: none need wait for the WAL to be flushed.
    connection.exec_driver_sql("SET synchronous_commit = off")
    tables = Base.metadata.sorted_tables
    for created, table in enumerate(tables, start=1):
        ddl = str(CreateTable(table).compile(dialect=connection.dialect)).lstrip()
        if not ddl.startswith("CREATE TABLE "):
            raise RuntimeError(f"unexpected DDL for table {table.name}: {ddl[:40]!r}")
        connection.exec_driver_sql(ddl.replace("CREATE TABLE", "CREATE TEMPORARY TABLE", 1))
        if created in (1, len(tables)):  # the first: before a constraint names a ledger table
            names = [t.name for t in tables[:created]]
            unshadowed = connection.execute(_UNSHADOWED, {"names": names}).scalars().all()
            if unshadowed:
                raise RuntimeError(
                    f"temporary tables do not shadow the ledger's {', '.join(unshadowed)} "
                    "(a search_path naming pg_temp after the ledger's schema?)"
                )
    connection.exec_driver_sql("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")


def _rehearse(scratch: Ledger, before_step: Callable[[str], None]) -> None:
    """What the engine writes and reads from a run's start to its first commit: the run, the
    first lease after its tamper check, the "training" beat, the hand back's early tamper check
    and its look for the bundle, then the commit's one transaction (`Hops._commit_and_lease`:
    output row, "uploaded", "committed" with the run's base model pinned, the next hop's lease).
    """
    run_id = uuid.uuid4().hex
    hops = [
        HopRow(id=uuid.uuid4().hex, index=i, site=f"warm-up-{i}", status="pending",
               hyperparameters={"learning_rate": 1e-4, "steps": 1}, metrics={})
        for i in range(3)
    ]  # fmt: skip
    ids = [hop.id for hop in hops]
    scratch.create_run(run_id, "warm-up", {"dataset": "warm-up"}, hops, None)
    scratch.stored_run_mismatches(run_id, None)
    scratch.lease_hop(ids[0], "lease-0", None)
    scratch.transition_hop(ids[0], expected=("leased",), status="training", event="hop.training")
    scratch.stored_run_mismatches(run_id, None)
    scratch.stored_sizes(ids[0])  # the hand back's look for a bundle stored already
    sha = "0" * 64
    output = uploads.stored_checkpoint_row(
        sha256=sha, run_id=run_id, hop_id=ids[0], producer_site="warm-up-0", size=1,
        parent_sha256=None, manifest={"base_model_sha256": "0" * 64}, tensors=[],
        signature="", producer_certificate="",
    )  # fmt: skip
    with scratch.transaction():
        scratch.record_checkpoint(output)
        scratch.transition_hop(
            ids[0], expected=("leased", "training"), status="uploaded", event="hop.uploaded",
            payload={"output_sha256": sha},
        )  # fmt: skip
        before_step("ledger commit")
        scratch.commit_hop(
            ids[0], lease_token="lease-0", output_sha256=sha, metrics={"loss": 1.0},
            train_started_at_ns=1, train_finished_at_ns=2, base_model_sha256="0" * 64,
        )  # fmt: skip
        scratch.lease_hop(ids[1], "lease-1", sha)
    scratch.stored_run_mismatches(run_id, sha)
    scratch.stored_run_mismatches(run_id, None)
