"""Alembic environment: runs on the connection the Ledger hands over (never creates its own)."""

from __future__ import annotations

from alembic import context

from coordinator.ledger.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through coordinator.ledger.Ledger.migrate()")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
