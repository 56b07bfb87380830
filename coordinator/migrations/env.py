"""Alembic environment for the ledger schema.

Three ways in: `Ledger.migrate()` hands over its own connection; `baton db ...` and the plain
`alembic` command (alembic.ini at the repository root) give a URL, from `-x url=...`, the
config's `sqlalchemy.url` or BATON_DATABASE_URL, in that order; `--sql` (offline mode) prints the
migration SQL for a DBA without connecting.

Every migration holds the ledger's schema lock (`hold_schema_lock`, as a first start's
`Ledger.create_if_empty` does) from before Alembic reads the database's revision to its commit:
an upgrade racing a coordinator's first start, or another upgrade, waits for it and then finds
the schema made, rather than both running the same DDL.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

from alembic import context
from sqlalchemy import Connection, create_engine, event, pool

from coordinator.ledger._chain import SCHEMA_LOCK, hold_schema_lock, sqlite_pragmas
from coordinator.ledger.models import Base


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or context.config.get_main_option("sqlalchemy.url")
        or os.environ.get("BATON_DATABASE_URL")
    )
    if not url:
        raise SystemExit(
            "error: no ledger database URL: give -x url=DIALECT://... or set BATON_DATABASE_URL"
        )
    return url


def _run_online(connection: Connection) -> None:
    """Runs the command in one transaction on `connection` (the caller's, if it has one open),
    holding the schema lock before Alembic reads anything.

    The transaction is begun before `configure`, so Alembic takes it as external and begins and
    commits none of its own: on SQLite (no transactional DDL to Alembic) it would otherwise
    commit after each migration, and with it drop the lock half way through the chain.
    """
    with nullcontext() if connection.in_transaction() else connection.begin():
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
        )
        # `current` reads the revision only: it need not wait out a migration (nor, on
        # SQLite, take the write lock).
        if not context.get_context().opts.get("dont_mutate", False):
            hold_schema_lock(connection)
        with context.begin_transaction():
            context.run_migrations()


def _run_offline(url: str) -> None:
    """Prints the SQL. PostgreSQL's script takes the schema lock first, inside its own
    BEGIN ... COMMIT: applied by hand (psql -f), it then waits out (and holds off) a
    coordinator's first start or an upgrade, as `baton db upgrade` would. SQLite's script gets
    no lock: Alembic gives it no transaction to hold one in (each statement commits on its own),
    and `BEGIN IMMEDIATE` there would need a COMMIT Alembic does not print."""
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        if context.get_context().dialect.name == "postgresql":
            context.execute(
                f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK})"
                " /* the Baton ledger's schema lock, as every schema change takes it */"
            )
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:
    _run_online(given)
elif context.is_offline_mode():
    _run_offline(_url())
else:
    # The pool's connect listener: the PRAGMAs of a ledger's own connections (WAL, its busy
    # timeout, which bounds the wait for the schema lock on SQLite).
    engine = create_engine(_url(), poolclass=pool.NullPool)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", sqlite_pragmas)
    try:
        with engine.connect() as opened:
            _run_online(opened)
    finally:
        engine.dispose()
