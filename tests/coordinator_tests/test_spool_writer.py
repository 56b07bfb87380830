"""An upload's spool file: writeback started as it grows, and only ever a prefix of the upload."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from coordinator.engine import uploads

MiB = 1024 * 1024


def _writer(path: Path) -> uploads._SpoolWriter:
    return uploads._SpoolWriter(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), 0)


def test_writeback_is_started_every_8_mib_without_waiting_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[tuple[int, int]] = []
    monkeypatch.setattr(uploads, "_start_writeback",
                        lambda fd, offset, length: started.append((offset, length)))  # fmt: skip
    writer = _writer(tmp_path / "partial")
    try:
        for _ in range(20):
            writer.write(bytes(MiB))
    finally:
        os.close(writer.fd)
    assert started == [(0, 8 * MiB), (8 * MiB, 8 * MiB)]
    assert (tmp_path / "partial").stat().st_size == 20 * MiB


def test_the_kernel_call_that_starts_writeback_is_found_and_takes_a_file_range(
    tmp_path: Path,
) -> None:
    start = uploads._sync_file_range()
    if start is None:
        pytest.skip("sync_file_range is Linux's")
    path = tmp_path / "partial"
    path.write_bytes(b"x" * 3 * MiB)
    fd = os.open(path, os.O_WRONLY)
    try:
        start(fd, 0, 3 * MiB)  # no error, and the file is untouched
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 3 * MiB


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


@pytest.mark.parametrize("platform", ["win32", "darwin", "linux"])
def test_without_the_kernel_call_uploads_go_on_with_the_fsync_alone(
    monkeypatch: pytest.MonkeyPatch, platform: str
) -> None:
    def no_libc(*_: object, **__: object) -> object:
        raise TypeError("expected str, bytes or os.PathLike object, not NoneType")  # Windows

    monkeypatch.setattr(uploads.sys, "platform", platform)
    monkeypatch.setattr(uploads.ctypes, "CDLL", no_libc)
    assert uploads._sync_file_range() is None
