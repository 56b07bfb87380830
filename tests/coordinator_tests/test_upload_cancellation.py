"""A cancelled upload or download handler never closes a descriptor a worker thread still uses."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.engine import uploads
from coordinator.engine.uploads import UploadIntake
from coordinator.metrics import CoordinatorMetrics
from coordinator.store import CheckpointStore
from protocols.v1 import baton_pb2 as pb


def _intake() -> UploadIntake:
    intake = object.__new__(UploadIntake)  # _spool_chunks needs only the metrics
    intake.metrics = CoordinatorMetrics()
    return intake


def test_cancelled_upload_waits_for_the_chunk_write_in_flight_before_closing_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    writing = threading.Event()
    outcome: list[str] = []
    write = uploads._SpoolWriter.write

    def slow_write(self: uploads._SpoolWriter, chunk: Any) -> None:
        writing.set()
        release.wait(60)
        try:
            os.fstat(self.fd)  # the descriptor is still this upload's file
            write(self, chunk)
            outcome.append("written")
        except OSError as exc:
            outcome.append(f"failed: {exc}")

    monkeypatch.setattr(uploads._SpoolWriter, "write", slow_write)
    partial = tmp_path / "partial"
    header = pb.UploadHeader(hop_id="h", total_size=10)
    second_chunk = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.to_thread(writing.wait, 60)
        second_chunk.set()
        yield b"again"  # queued behind the first chunk's write
        await asyncio.Event().wait()

    async def scenario() -> None:
        task = asyncio.create_task(_intake()._spool_chunks(partial, header, chunks()))
        await second_chunk.wait()
        await asyncio.sleep(0)
        task.cancel()  # the client went away while the first chunk is being written
        await asyncio.wait([task], timeout=0.5)  # the unfixed handler closes its file now
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    # Both chunks received before the cancellation are written, in order, before the file
    # closes (the second was queued behind the first: a prefix of the upload, to resume from).
    assert outcome == ["written", "written"]
    assert partial.read_bytes() == b"firstagain"


def test_cancelled_upload_closes_the_file_whose_open_was_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    opening = threading.Event()
    opened: list[int] = []
    open_at = uploads._open_at

    def slow_open_at(path: Path, offset: int) -> int:
        opening.set()
        release.wait(60)
        opened.append(open_at(path, offset))
        return opened[-1]

    monkeypatch.setattr(uploads, "_open_at", slow_open_at)

    async def chunks() -> AsyncIterator[bytes]:
        yield b"never read"

    async def scenario() -> None:
        header = pb.UploadHeader(hop_id="h", total_size=10)
        task = asyncio.create_task(_intake()._spool_chunks(tmp_path / "p", header, chunks()))
        await asyncio.to_thread(opening.wait, 60)
        task.cancel()
        await asyncio.wait([task], timeout=0.5)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert len(opened) == 1
    with pytest.raises(OSError):
        os.fstat(opened[0])  # closed, not leaked


def test_cancelled_download_waits_for_the_read_in_flight_before_closing_the_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path / "store")
    sha = store.put(b"0123456789")
    release = threading.Event()
    reading = threading.Event()
    outcome: list[str] = []
    pread = os.pread

    def slow_pread(fd: int, size: int, offset: int) -> bytes:
        if offset:  # the read ahead, after the first chunk was handed out
            reading.set()
            release.wait(60)
        try:
            data = pread(fd, size, offset)
        except OSError as exc:
            outcome.append(f"failed: {exc}")
            raise
        outcome.append("read")
        return data

    monkeypatch.setattr(os, "pread", slow_pread)

    async def scenario() -> None:
        async def consume() -> None:
            async for _ in store.read_framed(sha, 0, 4, lambda chunk, _offset: chunk):
                await asyncio.to_thread(reading.wait, 60)

        task = asyncio.create_task(consume())
        await asyncio.to_thread(reading.wait, 60)
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait([task], timeout=0.5)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert outcome == ["read", "read"]
