"""An upload's spool file: made durable behind the stream, and only ever a prefix of the upload."""

from __future__ import annotations

import concurrent.futures
import errno
import os
import threading
from pathlib import Path

import numpy as np
import pytest

from coordinator.engine import uploads

MiB = 1024 * 1024
WAIT = 30.0


def _writer(path: Path, offset: int = 0) -> uploads._SpoolWriter:
    return uploads._SpoolWriter(uploads._open_at(path, offset), offset)


def _upload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(size)


class _GatedSync:
    """`os.fdatasync` that waits for `gate` (a slow disk), then syncs."""

    def __init__(self, real: object = os.fdatasync) -> None:
        self.gate = threading.Event()
        self.called = threading.Event()
        self.threads: list[str] = []
        self._real = real

    def __call__(self, fd: int) -> None:
        self.threads.append(threading.current_thread().name)
        self.called.set()
        assert self.gate.wait(WAIT)
        os.fsync(fd)


def test_the_file_is_made_durable_every_8_mib_behind_the_stream_without_waiting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk takes an upload's bytes while the next ones arrive (an fdatasync every 8 MiB
    on a sync thread), so the fsync before its commit finds little left: writes go on while a
    sync runs (one at a time per upload; the next covers all written meanwhile)."""
    sync = _GatedSync()
    monkeypatch.setattr(uploads.os, "fdatasync", sync)
    path = tmp_path / "partial"
    data = _upload(28 * MiB)
    writer = _writer(path)
    try:
        for at in range(0, 20 * MiB, MiB):
            writer.write(data[at : at + MiB])
        assert sync.called.wait(WAIT)
        # One in flight, of the first 8 MiB: the writes after it did not wait for it.
        assert (writer.syncs, writer.unsynced) == (1, 8 * MiB)
        assert path.stat().st_size == 20 * MiB
        sync.gate.set()
        writer.flush()  # waits for the sync in flight
        for at in range(20 * MiB, 28 * MiB, MiB):
            writer.write(data[at : at + MiB])
        writer.flush()
    finally:
        os.close(writer.fd)
    # The second started at the first write after the first had ended: all written meanwhile.
    assert (writer.syncs, writer.unsynced) == (2, 21 * MiB)
    assert all(name.startswith("upload-sync") for name in sync.threads)
    assert path.read_bytes() == data


def test_the_file_is_not_closed_under_a_sync_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`flush` (before the file is closed) returns only once the sync in flight has ended: an
    fdatasync must never run on a closed (or reused) descriptor."""
    sync = _GatedSync()
    monkeypatch.setattr(uploads.os, "fdatasync", sync)
    writer = _writer(tmp_path / "partial")
    try:
        for _ in range(8):
            writer.write(bytes(MiB))
        assert sync.called.wait(WAIT)
        flushed = threading.Event()
        flushing = threading.Thread(target=lambda: (writer.flush(), flushed.set()))
        flushing.start()
        assert not flushed.wait(0.2)
        sync.gate.set()
        assert flushed.wait(WAIT)
        flushing.join()
    finally:
        os.close(writer.fd)
    assert writer.failed is None


def test_a_failed_sync_fails_the_upload_and_nothing_more_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fdatasync's error is reported once (a later fsync of the file may not see it): the
    upload fails with it, at the next write or at `flush`, and the file stays a prefix."""

    def io_error(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(uploads.os, "fdatasync", io_error)
    path = tmp_path / "partial"
    writer = _writer(path)
    try:
        for _ in range(8):
            writer.write(b"a" * MiB)  # the sync starts here, and fails
        syncing = writer._syncing
        assert syncing is not None
        concurrent.futures.wait([syncing])  # it has failed by now
        for _ in range(7):
            writer.write(b"b" * MiB)
        with pytest.raises(OSError, match="Input/output error"):
            writer.write(b"b" * MiB)  # the 16th MiB would start the next sync: it raises
        with pytest.raises(OSError, match="Input/output error"):
            writer.write(b"c" * MiB)
        writer.flush()
    finally:
        os.close(writer.fd)
    assert isinstance(writer.failed, OSError) and writer.failed.errno == errno.EIO
    assert path.read_bytes() == b"a" * 8 * MiB + b"b" * 8 * MiB  # no "c"


def test_a_sync_failing_after_the_last_chunk_is_kept_by_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync = _GatedSync()

    def gated_then_failing(fd: int) -> None:
        sync(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(uploads.os, "fdatasync", gated_then_failing)
    writer = _writer(tmp_path / "partial")
    try:
        for _ in range(9):
            writer.write(bytes(MiB))
        sync.gate.set()
        writer.flush()  # never raises
    finally:
        os.close(writer.fd)
    assert isinstance(writer.failed, OSError) and writer.failed.errno == errno.EIO


def test_after_a_failed_write_nothing_more_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk queued behind a failed write (a full disk) must not land after the failure's
    gap: the file stays a prefix of the upload, so a cut upload resumes from its end."""
    writer = _writer(tmp_path / "partial")
    real_write = os.write
    calls: list[int] = []

    def full_disk(fd: int, data: memoryview) -> int:
        calls.append(len(data))
        if len(calls) == 2:  # the second chunk: half of it fits, then the disk is full
            return real_write(fd, data[: len(data) // 2])
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(uploads.os, "write", full_disk)
    try:
        writer.write(b"a" * 10)
        with pytest.raises(OSError, match="No space left"):
            writer.write(b"b" * 10)
        monkeypatch.setattr(uploads.os, "write", real_write)  # space is back
        with pytest.raises(OSError, match="No space left"):
            writer.write(b"c" * 10)
    finally:
        os.close(writer.fd)
    assert (tmp_path / "partial").read_bytes() == b"a" * 10 + b"b" * 5
    assert writer.position == 10


def test_a_resumed_upload_goes_on_from_its_offset(tmp_path: Path) -> None:
    path = tmp_path / "partial"
    data = _upload(9 * MiB + 100)
    path.write_bytes(data[:1001] + b"stale bytes past the resume point")
    writer = _writer(path, 1001)
    try:
        rng = np.random.default_rng(1)
        while writer.position < len(data):
            step = int(rng.integers(1, 3 * MiB))
            writer.write(data[writer.position : writer.position + step])
        writer.flush()
    finally:
        os.close(writer.fd)
    assert writer.syncs == 1 and writer.failed is None
    assert path.read_bytes() == data
