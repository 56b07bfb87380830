"""Alembic environment for the ledger schema.

Three ways in: `Ledger.migrate()` hands over its own connection; `baton db ...` and the plain
`alembic` command (alembic.ini at the repository root) give a URL, from `-x url=...`, the
config's `sqlalchemy.url` or BATON_DATABASE_URL, in that order; `--sql` (offline mode) prints the
migration SQL for a DBA without connecting.
"""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine, pool

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


connection = context.config.attributes.get("connection")
if connection is not None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
elif context.is_offline_mode():
    url = _url()
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.connect() as opened:
        context.configure(
            connection=opened,
            target_metadata=Base.metadata,
            render_as_batch=opened.dialect.name == "sqlite",
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
