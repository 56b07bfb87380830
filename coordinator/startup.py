"""Start-up checks that turn a misconfigured coordinator into one line saying what to fix.

Also the single-instance guard: one coordinator per state directory and per ledger database
(a file lock beside the state, and for PostgreSQL a session advisory lock held on a dedicated
connection), so a second coordinator never splits the sites or writes the same ledger.
"""

from __future__ import annotations

import errno
import fcntl
import getpass
import hashlib
import os
import re
import socket
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, make_url, text
from sqlalchemy.engine import URL
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool

__all__ = [
    "AlreadyRunning",
    "InstanceLock",
    "StartupError",
    "database_error",
    "masked_url",
    "parse_database_url",
]

# Key of the PostgreSQL advisory lock that marks a database as in use by a coordinator.
_INSTANCE_LOCK = int.from_bytes(hashlib.sha256(b"baton-coordinator").digest()[:8], "big") >> 1
_LOCK_FILE = "coordinator.lock"
_URL_FORMS = "sqlite:///PATH or postgresql+psycopg://USER:PASSWORD@HOST:PORT/DATABASE"


class StartupError(Exception):
    """The coordinator cannot start as configured; the message says what to fix."""


class AlreadyRunning(StartupError):
    """Another coordinator holds this state directory, database or port."""


def masked_url(url: str | URL) -> str:
    """The database URL with its password replaced by ***, even if it does not parse."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", str(url))


def parse_database_url(url: str) -> URL:
    """Parses a ledger URL, refusing unknown dialects and drivers with what to write instead."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StartupError(
            f"database URL {masked_url(url)!r} is not a URL; write {_URL_FORMS}"
        ) from exc
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError as exc:
        raise StartupError(
            f"database URL {masked_url(parsed)}: unknown dialect {parsed.drivername!r}; "
            f"write {_URL_FORMS}"
        ) from exc
    if dialect.name not in ("sqlite", "postgresql"):
        raise StartupError(
            f"database URL {masked_url(parsed)}: the ledger supports SQLite and PostgreSQL only; "
            f"write {_URL_FORMS}"
        )
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise StartupError(
            f"database URL {masked_url(parsed)}: its driver is not installed ({exc.name}); "
            "for PostgreSQL install baton-fl[postgres] and use postgresql+psycopg://"
        ) from exc
    return parsed


def database_error(url: str, exc: SQLAlchemyError) -> StartupError:
    """One line for a database that cannot be opened, reached or migrated (password masked)."""
    original = getattr(exc, "orig", None) or exc
    detail = " ".join(str(original).split()) or type(original).__name__
    password = make_url(url).password if "://" in url else None
    if password:
        detail = detail.replace(str(password), "***")
    detail = detail.split("(Background on this error")[0].strip()
    return StartupError(
        f"cannot open the ledger database {masked_url(url)}: {detail}; check the host, port, "
        "database name and credentials (or the file's folder and permissions)"
    )


def _holder_text() -> str:
    return (
        f"pid {os.getpid()} on {socket.gethostname()} (user {getpass.getuser()}), "
        f"since {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC"
    )


class _FileClaim:
    """An exclusive `flock` on a lock file, held until `release` (or the process's end: the
    kernel drops it with the descriptor, so a crashed coordinator leaves no stale claim).

    The lock `filelock` takes on Unix (and earlier coordinators took), without the package: its
    import was 2% of `coordinator serve`'s CPU to ready.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Takes the lock without waiting; False if another process (or claim) holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)  # as filelock did
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                return False
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class InstanceLock:
    """Holds this coordinator's claim on its state directory and ledger database until released.

    Args:
        state_dir: The coordinator's state directory (checkpoints, runs, SQLite ledger).
        database_url: The ledger URL; PostgreSQL ledgers are also locked in the database.
    """

    def __init__(self, state_dir: Path, database_url: str) -> None:
        self.state_dir = state_dir
        self.database_url = database_url
        self._files: list[_FileClaim] = []
        self._engine: Engine | None = None
        self._connection: Connection | None = None

    def acquire(self) -> None:
        """Claims the state directory (and database); raises AlreadyRunning if another holds it.

        Raises:
            AlreadyRunning: Another coordinator holds the state directory or the database.
            StartupError: The database cannot be reached.
        """
        url = make_url(self.database_url)
        paths = [(self.state_dir / _LOCK_FILE, f"the state directory {self.state_dir}")]
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            database = Path(url.database).resolve()  # type: ignore[arg-type]
            if not database.parent.is_dir():
                raise StartupError(
                    f"the folder of the SQLite ledger {database} does not exist: create it or "
                    "fix --database-url"
                )
            if database.parent != self.state_dir.resolve():
                paths.append(
                    (database.with_name(database.name + ".lock"), f"the SQLite ledger {database}")
                )
        try:
            for path, what in paths:
                lock = _FileClaim(path)
                if not lock.acquire():
                    raise AlreadyRunning(
                        f"another coordinator is using {what} "
                        f"({self._owner(path)}); stop it first, or give this one its own "
                        "--state-dir and database"
                    )
                self._files.append(lock)
                # Who holds it, for a refused contender's message (in a file of its own: a
                # contender's filelock, in earlier coordinators, truncated the lock file).
                path.with_suffix(".owner").write_text(_holder_text() + "\n")
            if url.get_backend_name() == "postgresql":
                self._lock_database(url)
        except BaseException:
            self.release()
            raise

    def _owner(self, lock_path: Path) -> str:
        try:
            return lock_path.with_suffix(".owner").read_text().strip() or "holder unknown"
        except OSError:
            return "holder unknown"

    def _lock_database(self, url: URL) -> None:
        holder = f"baton-coordinator {_holder_text()}"[:63]
        self._engine = create_engine(
            url, poolclass=NullPool, connect_args={"application_name": holder}
        )
        try:
            self._connection = self._engine.connect()
            locked = self._connection.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": _INSTANCE_LOCK}
            ).scalar()
            self._connection.commit()
        except SQLAlchemyError as exc:
            raise database_error(self.database_url, exc) from exc
        if not locked:
            raise AlreadyRunning(
                f"another coordinator is using the database {masked_url(url)} "
                f"({self._database_holder()}); stop it first, or point this one at another "
                "database"
            )

    def _database_holder(self) -> str:
        assert self._connection is not None
        try:
            row = self._connection.execute(
                text(
                    "SELECT a.application_name, a.client_addr FROM pg_locks l "
                    "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
                    "AND l.granted AND l.classid = :high AND l.objid = :low AND l.database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"high": _INSTANCE_LOCK >> 32, "low": _INSTANCE_LOCK & 0xFFFFFFFF},
            ).first()
        except SQLAlchemyError:
            return "holder unknown"
        if row is None:
            return "holder unknown"
        name, address = row
        return f"{name or 'holder unknown'}" + (f" from {address}" if address else "")

    def release(self) -> None:
        """Gives up every claim (idempotent)."""
        if self._connection is not None:
            self._connection.close()  # ends the session, so PostgreSQL drops the advisory lock
            self._connection = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        for lock in reversed(self._files):
            lock.path.with_suffix(".owner").unlink(missing_ok=True)
            lock.release()
        self._files.clear()
