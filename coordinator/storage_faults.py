"""Storage faults (disk full, quota, I/O errors): told apart from bugs, reported, ledgered.

A full disk must not lose a site's finished work: the engine turns a storage error into
`StorageFault` (answered as a retryable UNAVAILABLE), remembers since when storage has failed,
and ledgers the fault (and the recovery) as soon as the ledger can write again.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from sqlalchemy.exc import OperationalError

from coordinator.errors import StorageFault

__all__ = ["StorageHealth", "storage_fault_reason"]

logger = logging.getLogger(__name__)

_STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG})
# SQLite's messages for SQLITE_FULL, SQLITE_IOERR and SQLITE_READONLY_*.
_SQLITE_MESSAGES = ("database or disk is full", "disk i/o error", "attempt to write a readonly")
# PostgreSQL SQLSTATE class 53 (insufficient resources: disk full, out of memory) and 58030
# (I/O error): the server is up, its storage is not.
_PG_STATES = ("53", "58030")
_PROBE_BYTES = 64 * 1024


def storage_fault_reason(exc: BaseException) -> str | None:
    """Why `exc` is a storage fault ("No space left on device", ...), or None if it is not."""
    if isinstance(exc, OSError) and exc.errno in _STORAGE_ERRNOS:
        return os.strerror(exc.errno)  # no path: the reason reaches sites
    if isinstance(exc, OperationalError):
        original = exc.orig
        message = str(original).strip().splitlines()[0] if str(original).strip() else ""
        if any(text in message.lower() for text in _SQLITE_MESSAGES):
            return f"ledger database: {message}"
        state = str(getattr(original, "sqlstate", None) or getattr(original, "pgcode", "") or "")
        if state.startswith(_PG_STATES):
            return f"ledger database: {message}"
    return None


class _EventWriter(Protocol):
    def record_event(self, kind: str, **fields: object) -> None: ...


@dataclass
class _Fault:
    since: datetime
    reason: str
    operation: str
    ledgered: bool = False
    needs_bytes: int = 0


class StorageHealth:
    """The coordinator's view of its storage: healthy, or failing since when and why.

    Args:
        ledger: Where `storage.fault` and `storage.recovered` events go.
        probe_dir: A directory on the coordinator's state disk, written to test recovery.
    """

    def __init__(self, ledger: _EventWriter, probe_dir: Path) -> None:
        self.ledger = ledger
        self.probe_dir = probe_dir
        self._fault: _Fault | None = None
        self._last_log = 0.0

    @property
    def fault(self) -> str | None:
        """A status line while storage fails ("since 05:01:02 UTC: ..."), else None."""
        if self._fault is None:
            return None
        return (
            f"since {self._fault.since:%H:%M:%S} UTC: coordinator storage full: "
            f"{self._fault.reason} (during {self._fault.operation})"
        )

    @contextmanager
    def guard(self, operation: str, *, needs_bytes: int = 0) -> Iterator[None]:
        """Turns a storage error inside the block into `StorageFault` (retryable) and notes it.

        Args:
            operation: What the block does, for the fault's message.
            needs_bytes: What the block writes, if known and larger than the probe: a fault it
                raises ends only once that much is free (a small probe write succeeding in a
                disk that still cannot take the block would end and start the fault again with
                every retry).
        """
        try:
            yield
        except StorageFault:
            raise
        except Exception as exc:
            reason = storage_fault_reason(exc)
            if reason is None:
                raise
            self.report(operation, reason, needs_bytes=needs_bytes)
            raise StorageFault(f"coordinator storage full: {reason}; retrying") from exc

    def report(self, operation: str, reason: str, *, needs_bytes: int = 0) -> None:
        """Notes a storage fault; ledgers it now if the ledger can write, else on recovery."""
        if self._fault is not None:
            self._fault.needs_bytes = max(self._fault.needs_bytes, needs_bytes)
        if self._fault is None:
            self._fault = _Fault(datetime.now(UTC), reason, operation, needs_bytes=needs_bytes)
            logger.error("coordinator storage fault during %s: %s", operation, reason)
            self._write_fault_event()
        elif time.monotonic() - self._last_log > 30:
            logger.error("coordinator storage still failing (%s: %s)", operation, reason)
        else:
            return
        self._last_log = time.monotonic()

    def _write_fault_event(self) -> None:
        fault = self._fault
        if fault is None or fault.ledgered:
            return
        try:
            self.ledger.record_event(
                "storage.fault",
                payload={
                    "since": fault.since.isoformat(),
                    "reason": fault.reason,
                    "operation": fault.operation,
                },
            )
        except Exception as exc:
            if storage_fault_reason(exc) is None:
                raise
            return  # written once the ledger can write again
        fault.ledgered = True

    def check(self) -> bool:
        """Probes storage while a fault stands; ledgers the fault and its end once writable.

        Returns:
            True when storage is (again) healthy.
        """
        fault = self._fault
        if fault is None:
            return True
        probe = self.probe_dir / ".storage-probe"
        try:
            self.probe_dir.mkdir(parents=True, exist_ok=True)
            if fault.needs_bytes > _PROBE_BYTES:
                disk = os.statvfs(self.probe_dir)
                if disk.f_bavail * disk.f_frsize < fault.needs_bytes:
                    return False
            with probe.open("wb") as fh:
                fh.write(b"\0" * _PROBE_BYTES)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if storage_fault_reason(exc) is None:
                raise
            return False
        finally:
            probe.unlink(missing_ok=True)
        self._write_fault_event()
        if not fault.ledgered:
            return False
        try:
            self.ledger.record_event(
                "storage.recovered",
                payload={
                    "since": fault.since.isoformat(),
                    "seconds": round((datetime.now(UTC) - fault.since).total_seconds(), 3),
                    "reason": fault.reason,
                },
            )
        except Exception as exc:
            if storage_fault_reason(exc) is None:
                raise
            return False
        logger.warning("coordinator storage recovered (fault since %s)", fault.since.isoformat())
        self._fault = None
        return True
