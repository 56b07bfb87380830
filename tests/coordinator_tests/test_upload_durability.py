"""A streamed hand back's spool file is made durable while it streams (an fdatasync behind the
bytes), and nothing is committed that refers to a file before its fsync: a sync that fails
commits nothing, and the hop is handed back once the disk is well again."""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable

import pytest
from sqlalchemy import event

from coordinator.engine import uploads
from coordinator.server import Coordinator
from protocols.checkpoint import sha256_hex
from protocols.v1 import baton_pb2 as pb
from tests.coordinator_tests.conftest import ScriptedSite
from tests.coordinator_tests.test_hand_back import (
    _bundle,
    _hand_back,
    _spooled,
    _stored,
    _stored_and_committed,
    site,
    task,
)
from tests.coordinator_tests.test_uploads import _until

__all__ = ["site", "task"]  # fixtures

MiB = 1024 * 1024
FLOATS = 5 * MiB  # a 20 MiB bundle: 20 chunks, an fdatasync behind the stream at 8 MiB


def test_the_spool_file_is_synced_as_it_streams_and_fsynced_before_the_commit(
    site: ScriptedSite,
    task: pb.HopTask,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _bundle(site, task, FLOATS)
    ledger = coordinator.engine.ledger
    seen: list[tuple[str, int]] = []  # (what, inode of the file synced; 0 for a commit)
    lock = threading.Lock()
    real_fsync, real_fdatasync = os.fsync, os.fdatasync

    def noted(what: str, call: Callable[[int], None]) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            status = os.fstat(fd)
            call(fd)
            if stat.S_ISREG(status.st_mode):
                with lock:
                    seen.append((what, status.st_ino))

        return sync

    def committing(_connection: object) -> None:
        with lock:
            seen.append(("commit", 0))

    def committed(_seq: int, _hash: str, kinds: tuple[str, ...]) -> None:
        if "checkpoint.stored" in kinds:
            with lock:
                seen.append(("stored", 0))

    monkeypatch.setattr(uploads.os, "fsync", noted("fsync", real_fsync))
    monkeypatch.setattr(uploads.os, "fdatasync", noted("fdatasync", real_fdatasync))
    event.listen(ledger.engine, "commit", committing)
    ledger.head_observers.append(committed)
    try:
        assert _hand_back(site, task, data) == "committed"
    finally:
        ledger.head_observers.remove(committed)
        event.remove(ledger.engine, "commit", committing)
    stored = coordinator.engine.store.path(sha256_hex(data))
    inode = stored.stat().st_ino  # the spool file, renamed into the store
    with lock:
        order = list(seen)
    # The transaction that wrote the bundle's row: the last COMMIT before its observers ran.
    row_written = order.index(("stored", 0))
    commit = max(i for i, (what, _) in enumerate(order[:row_written]) if what == "commit")
    syncs = [what for what, synced in order[:commit] if synced == inode]
    assert "fdatasync" in syncs  # behind the stream (every 8 MiB, one at a time)
    assert syncs[-1] == "fsync"  # and the whole file before the commit that refers to it
    assert all(synced != inode for _, synced in order[commit:])


@pytest.mark.parametrize("failing", ["fdatasync", "fsync"])
def test_a_spool_file_sync_that_fails_commits_nothing_and_the_hop_is_handed_back_later(
    site: ScriptedSite,
    task: pb.HopTask,
    coordinator: Coordinator,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    """An I/O error of the sync behind the stream (reported to it alone: a later fsync may not
    see it) or of the fsync before the commit: answered as a retryable storage fault, with no
    checkpoint stored, no hop committed and no spool file kept; the disk well again, the same
    hand back commits the hop once."""
    data = _bundle(site, task, FLOATS)
    real = getattr(os, failing)
    failed = threading.Event()

    def io_error(fd: int) -> None:
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size >= 8 * MiB:
            failed.set()
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(uploads.os, failing, io_error)
    refused = _hand_back(site, task, data)
    monkeypatch.setattr(uploads.os, failing, real)
    assert failed.is_set()
    assert refused.startswith("UNAVAILABLE: ") and "Input/output error" in refused, refused
    assert _stored(coordinator) == [] and _spooled(coordinator) == []
    assert _stored_and_committed(coordinator, task) == (0, 0)
    hop = coordinator.engine.ledger.hop(task.hop_id)
    assert hop is not None and hop.status in ("leased", "training")
    _until(lambda: not coordinator.engine.storage.fault)  # the watchdog's probe: recovered
    assert _hand_back(site, task, data) == "committed"
    assert _stored(coordinator) == [sha256_hex(data)]
    assert _stored_and_committed(coordinator, task) == (1, 1)
    assert coordinator.engine.ledger.verify_chain() is None
