"""An upload's spool file: writeback started as it grows, and only ever a prefix of the upload."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import numpy as np
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


def _direct_writer(path: Path, offset: int = 0) -> uploads._SpoolWriter:
    fd = uploads._open_at(path, offset)
    writer = uploads._SpoolWriter(fd, offset, path)
    if offset % uploads._DIRECT_ALIGN == 0 and not writer.direct:
        os.close(fd)
        pytest.skip("no direct I/O on this file system")
    return writer


def _upload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def _feed(writer: uploads._SpoolWriter, data: bytes, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    position = 0
    while position < len(data):
        step = int(rng.integers(1, 300_000))
        writer.write(data[position : position + step])
        position += step


def test_bytes_go_to_the_disk_directly_all_but_the_unaligned_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "partial"
    data = _upload(3 * MiB + 12_345)
    writer = _direct_writer(path)
    through_page_cache: list[int] = []
    real_write = os.write

    def buffered(fd: int, view: memoryview) -> int:
        through_page_cache.append(len(view))
        return real_write(fd, view)

    monkeypatch.setattr(uploads.os, "write", buffered)
    try:
        _feed(writer, data)
        writer.flush()
    finally:
        os.close(writer.fd)
    assert writer.failed is None and not writer.direct
    assert path.read_bytes() == data
    assert sum(through_page_cache) == len(data) % uploads._DIRECT_ALIGN


def test_a_cut_upload_keeps_every_byte_received_once_flushed(tmp_path: Path) -> None:
    path = tmp_path / "partial"
    data = _upload(MiB + MiB // 2 + 7)
    writer = _direct_writer(path)
    try:
        _feed(writer, data)  # then the stream is cut: half a staging buffer is staged
        writer.flush()
    finally:
        os.close(writer.fd)
    assert path.read_bytes() == data


def test_a_resumed_upload_at_an_unaligned_offset_goes_through_the_page_cache(
    tmp_path: Path,
) -> None:
    path = tmp_path / "partial"
    data = _upload(2 * MiB + 100)
    path.write_bytes(data[:1001])
    writer = _direct_writer(path, 1001)
    assert not writer.direct
    try:
        _feed(writer, data[1001:])
        writer.flush()
    finally:
        os.close(writer.fd)
    assert path.read_bytes() == data


def test_direct_io_refused_at_open_or_at_a_write_falls_back_to_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _upload(3 * MiB + 5)
    path = tmp_path / "refused-at-write"
    writer = _direct_writer(path)
    real_pwrite = os.pwrite
    calls: list[int] = []

    def refuse_the_second(fd: int, view: memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, view, offset)

    monkeypatch.setattr(uploads.os, "pwrite", refuse_the_second)
    try:
        _feed(writer, data)
        assert not writer.direct
        writer.flush()
    finally:
        os.close(writer.fd)
    assert writer.failed is None and path.read_bytes() == data
    assert calls == [0, MiB]  # no direct write after the refusal

    monkeypatch.setattr(uploads, "_open_direct", lambda _path: None)
    path = tmp_path / "refused-at-open"
    writer = uploads._SpoolWriter(uploads._open_at(path, 0), 0, path)
    assert not writer.direct
    try:
        _feed(writer, data)
        writer.flush()
    finally:
        os.close(writer.fd)
    assert path.read_bytes() == data


def test_after_a_failed_direct_write_nothing_more_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "partial"
    writer = _direct_writer(path)
    real_pwrite = os.pwrite

    def full_disk(fd: int, view: memoryview, offset: int) -> int:
        if offset >= MiB:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, view, offset)

    monkeypatch.setattr(uploads.os, "pwrite", full_disk)
    data = _upload(3 * MiB)
    try:
        writer.write(data[:MiB])
        with pytest.raises(OSError, match="No space left"):
            writer.write(data[MiB:])
        monkeypatch.setattr(uploads.os, "pwrite", real_pwrite)  # space is back
        with pytest.raises(OSError, match="No space left"):
            writer.write(b"late")
        writer.flush()  # writes nothing: the failure stays
    finally:
        os.close(writer.fd)
    assert isinstance(writer.failed, OSError)
    assert path.read_bytes() == data[:MiB]


def test_a_stalled_upload_has_every_byte_received_in_its_file(tmp_path: Path) -> None:
    """While no chunk waits (a stalled stream), what is staged is put in the file: a site that
    asks how far its upload got is told every byte received; the upload then goes on."""
    path = tmp_path / "partial"
    data = _upload(3 * MiB + 999)
    writer = _direct_writer(path)
    try:
        for stall in (MiB + MiB // 2 + 3, 2 * MiB + 4096, len(data)):
            writer.write(data[writer.position : stall])
            writer.idle()  # the aligned part goes on a disk thread, as a full buffer does
            writer.settle()
            assert path.read_bytes() == data[:stall]
        assert writer.direct
        writer.flush()
    finally:
        os.close(writer.fd)
    assert path.read_bytes() == data


def test_a_full_buffer_is_written_while_the_next_chunk_is_staged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A direct write waits for the disk: the spool thread hands a full staging buffer to a disk
    thread and goes on with the next chunk (hashing and checking it meanwhile); the next full
    buffer's write starts only once that one has ended, so the file still grows in order."""
    path = tmp_path / "partial"
    writer = _direct_writer(path)
    data = _upload(2 * MiB + 10)
    gate = threading.Event()
    offsets: list[int] = []
    real_pwrite = os.pwrite

    def slow_disk(fd: int, view: memoryview, offset: int) -> int:
        if fd == writer._direct and offset == 0:
            gate.wait(60)
        offsets.append(offset)
        return real_pwrite(fd, view, offset)

    monkeypatch.setattr(uploads.os, "pwrite", slow_disk)
    staged = threading.Event()

    def spool_thread() -> None:
        writer.write(data[:MiB])  # full: handed to a disk thread, which waits on the gate
        writer.write(data[MiB : MiB + MiB // 2])  # staged meanwhile
        staged.set()
        writer.write(data[MiB + MiB // 2 :])  # the second buffer fills: waits for the first

    thread = threading.Thread(target=spool_thread)
    try:
        thread.start()
        assert staged.wait(60), "the spool thread waited for the disk before staging on"
        assert offsets == [] and path.stat().st_size == 0
    finally:
        gate.set()
        thread.join(60)
    try:
        writer.flush()
    finally:
        os.close(writer.fd)
    assert writer.failed is None
    assert offsets[:2] == [0, MiB]  # in file order, one after the other
    assert path.read_bytes() == data


def test_a_failed_write_in_flight_is_kept_by_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "partial"
    writer = _direct_writer(path)
    real_pwrite = os.pwrite

    def full_disk(fd: int, view: memoryview, offset: int) -> int:
        if fd == writer._direct:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, view, offset)

    monkeypatch.setattr(uploads.os, "pwrite", full_disk)
    try:
        writer.write(_upload(MiB))  # its write fails on the disk thread, after this returns
        writer.write(b"tail")
        writer.flush()  # waits for it: the failure is kept, the tail is not written
    finally:
        os.close(writer.fd)
    assert isinstance(writer.failed, OSError) and writer.failed.errno == errno.ENOSPC
    assert path.read_bytes() == b""
