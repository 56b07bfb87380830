"""Where studies are stored: the `--storage` option and its default (no Optuna import)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

__all__ = ["DEFAULT_STORAGE_FILE", "StudyStorage", "resolve_storage"]

DEFAULT_STORAGE_FILE = "baton-studies.sqlite3"

StudyStorage = Annotated[
    str | None,
    typer.Option(
        "--storage",
        envvar="BATON_STUDY_STORAGE",
        help=f"Optuna storage URL (default: sqlite file {DEFAULT_STORAGE_FILE} in the current "
        "directory)",
    ),
]


def resolve_storage(storage: str | None) -> str:
    """The study storage URL: `storage`, or the default SQLite file in the current directory."""
    if storage:
        return storage
    return f"sqlite:///{Path(DEFAULT_STORAGE_FILE).resolve()}"
