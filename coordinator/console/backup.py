"""Backup and restore of a coordinator's ledger (SQLite) and checkpoint store.

The ledger is copied first, with SQLite's online backup API (consistent while the coordinator
runs), then the content-addressed store: a checkpoint is stored before the ledger references it,
so every checkpoint the copied ledger names is already on disk when the store is copied. A
PostgreSQL ledger is dumped with pg_dump instead; this module then copies the store only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import make_url, select
from sqlalchemy.orm import Session

from coordinator.ledger import CheckpointRow, Ledger
from coordinator.store import fsync_write

__all__ = [
    "MANIFEST",
    "BackupError",
    "BackupSummary",
    "backup",
    "pg_dump_advice",
    "restore",
]

MANIFEST = "baton-backup.json"
_LEDGER_FILE = "ledger.sqlite3"
_FORMAT = 1


class BackupError(Exception):
    """A backup or restore that cannot be made safely; nothing was overwritten."""


@dataclass(frozen=True)
class BackupSummary:
    events: int
    head: str
    checkpoints: int
    ledger_copied: bool


def pg_dump_advice(url: str, directory: Path) -> str:
    """The pg_dump / pg_restore commands for a PostgreSQL ledger (password never shown)."""
    shown = make_url(url).set(drivername="postgresql").render_as_string(hide_password=True)
    dump = directory / "ledger.pgdump"
    return (
        f"PostgreSQL ledgers are backed up with pg_dump: pg_dump --format=custom "
        f"--file {dump} '{shown}'; restore with pg_restore --clean --if-exists "
        f"--dbname '{shown}' {dump}"
    )


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise BackupError("an in-memory SQLite ledger cannot be backed up")
    return Path(parsed.database)


def _checkpoint_hashes(url: str) -> list[str]:
    ledger = Ledger(url)
    try:
        with Session(ledger.engine) as session:
            return sorted(session.scalars(select(CheckpointRow.sha256)))
    finally:
        ledger.close()


def _ledger_state(url: str) -> tuple[int, str, str | None]:
    ledger = Ledger(url)
    try:
        broken = ledger.verify_chain()
        return len(ledger.events()), ledger.head(), None if broken is None else broken.reason
    finally:
        ledger.close()


def _sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (the online backup API), fsynced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    src = sqlite3.connect(source)
    try:
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            (result,) = dst.execute("PRAGMA integrity_check").fetchone()
            if result != "ok":
                raise BackupError(f"copied ledger fails SQLite's integrity check: {result}")
        finally:
            dst.close()
    finally:
        src.close()
    fd = os.open(partial, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    partial.replace(target)


def _copy_checkpoints(hashes: list[str], source: Path, target: Path) -> None:
    for sha256 in hashes:
        origin = source / sha256[:2] / sha256
        if not origin.is_file():
            raise BackupError(f"checkpoint {sha256} is in the ledger but not in {source}")
        data = origin.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BackupError(f"checkpoint {sha256} is corrupt in {source}")
        fsync_write(target / sha256[:2] / sha256, data, mode=0o444)


def backup(
    state_dir: Path, database_url: str, out: Path, *, store_only: bool = False
) -> BackupSummary:
    """Writes the ledger (SQLite), every checkpoint it names, runs/ and a manifest to `out`.

    Raises:
        BackupError: `out` is not empty, the ledger is PostgreSQL without `store_only`, or a
            checkpoint the ledger names is missing or corrupt.
    """
    if out.exists() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty: back up into a new folder")
    source = _sqlite_path(database_url)
    if source is None and not store_only:
        raise BackupError(pg_dump_advice(database_url, out) + "; then run this with --store-only")
    if source is not None and not source.is_file():
        raise BackupError(f"no ledger at {source}")
    out.mkdir(parents=True, exist_ok=True)
    copied_url = database_url
    if source is not None and not store_only:
        _sqlite_copy(source, out / _LEDGER_FILE)
        copied_url = f"sqlite:///{(out / _LEDGER_FILE).resolve()}"
    hashes = _checkpoint_hashes(copied_url)
    _copy_checkpoints(hashes, state_dir / "checkpoints", out / "checkpoints")
    if (state_dir / "runs").is_dir():
        shutil.copytree(state_dir / "runs", out / "runs")
    events, head, broken = _ledger_state(copied_url)
    if broken is not None:
        raise BackupError(f"the ledger does not verify ({broken}); backup kept in {out}")
    manifest = {
        "format": _FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "ledger": _LEDGER_FILE if source is not None and not store_only else "pg_dump",
        "events": events,
        "head": head,
        "checkpoints": hashes,
    }
    fsync_write(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    return BackupSummary(events, head, len(hashes), source is not None and not store_only)


def restore(backup_dir: Path, state_dir: Path) -> BackupSummary:
    """Restores a backup into an empty (or new) state directory, checking every file first.

    Raises:
        BackupError: The backup is incomplete or corrupt, or `state_dir` already holds a
            ledger or checkpoints (nothing is overwritten).
    """
    try:
        manifest = json.loads((backup_dir / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{backup_dir} holds no readable {MANIFEST}: {exc}") from exc
    if manifest.get("format") != _FORMAT:
        raise BackupError(f"unknown backup format {manifest.get('format')!r}")
    if manifest.get("ledger") != _LEDGER_FILE:
        raise BackupError(
            "this backup holds no ledger (PostgreSQL): restore it with pg_restore, then copy "
            f"{backup_dir / 'checkpoints'} into the state directory"
        )
    for existing in (state_dir / _LEDGER_FILE, state_dir / "checkpoints", state_dir / "runs"):
        if existing.exists():
            raise BackupError(
                f"{existing} exists: restore into a new state directory, or move it away first"
            )
    ledger_copy = backup_dir / _LEDGER_FILE
    if not ledger_copy.is_file():
        raise BackupError(f"{ledger_copy} is missing")
    url = f"sqlite:///{ledger_copy.resolve()}"
    events, head, broken = _ledger_state(url)
    if broken is not None or (events, head) != (manifest["events"], manifest["head"]):
        raise BackupError(f"the backed-up ledger does not match its manifest ({broken or head})")
    hashes = _checkpoint_hashes(url)
    staging = state_dir.with_name(state_dir.name + ".restoring")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        _copy_checkpoints(hashes, backup_dir / "checkpoints", staging / "checkpoints")
        _sqlite_copy(ledger_copy, staging / _LEDGER_FILE)
        if (backup_dir / "runs").is_dir():
            shutil.copytree(backup_dir / "runs", staging / "runs")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in ("checkpoints", "runs", _LEDGER_FILE):
        if (staging / name).exists():
            (staging / name).replace(state_dir / name)
    shutil.rmtree(staging)
    return BackupSummary(events, head, len(hashes), True)
