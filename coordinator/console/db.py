"""`baton db`: the ledger schema's Alembic revisions, applied, shown or printed as SQL."""

from __future__ import annotations

import io
from pathlib import Path

from alembic import command
from alembic.config import Config

__all__ = ["current", "history", "upgrade"]

_MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


def _config(url: str, out: io.StringIO) -> Config:
    config = Config(stdout=out, output_buffer=out)
    config.set_main_option("script_location", str(_MIGRATIONS))
    # ConfigParser interpolation: a literal % (URL-encoded passwords) must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head", *, sql: bool = False) -> str:
    """Applies migrations up to `revision`; with `sql`, only returns their SQL (no connection)."""
    out = io.StringIO()
    command.upgrade(_config(url, out), revision, sql=sql)
    return out.getvalue()


def current(url: str) -> str:
    """The revision the database is at ('' for an empty database)."""
    out = io.StringIO()
    command.current(_config(url, out))
    return out.getvalue().strip()


def history() -> str:
    """Every revision, oldest last, with its message."""
    out = io.StringIO()
    command.history(_config("sqlite://", out))
    return out.getvalue()
