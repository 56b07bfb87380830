"""An upload's chunks go to its spool thread without a round trip per chunk, in order, bounded."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from coordinator.engine import uploads
from coordinator.engine.uploads import _SpoolPipe, _SpoolWriter
from protocols.checkpoint_stream import BundleStream


class _GatedWriter(_SpoolWriter):
    """A spool writer whose writes wait for `gate` (a disk slower than the network)."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd, 0)
        self.gate = threading.Event()
        self.fail_at: int | None = None  # the write (0-based) that fails
        self.writes = 0

    def write(self, chunk: memoryview | bytes) -> None:
        self.gate.wait(60)
        if self.writes == self.fail_at:
            self.writes += 1
            raise OSError(28, "No space left on device")
        self.writes += 1
        super().write(chunk)


def test_chunks_queue_behind_a_slow_write_in_order_with_one_job_and_a_bounded_queue(
    tmp_path: Path,
) -> None:
    path = tmp_path / "partial"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    chunks = [bytes([n]) * 1000 for n in range(6)]

    async def scenario() -> _SpoolPipe:
        writer = _GatedWriter(fd)
        pipe = _SpoolPipe(writer, BundleStream(), depth=2)
        for chunk in chunks[:3]:  # the first is being written, two wait: no wait for room
            await asyncio.wait_for(pipe.put(chunk), 30)
        full = asyncio.create_task(pipe.put(chunks[3]))  # a third waiting one: over depth
        await asyncio.sleep(0.05)
        assert not full.done()
        writer.gate.set()
        await asyncio.wait_for(full, 30)
        for chunk in chunks[4:]:
            await pipe.put(chunk)
        await asyncio.wait_for(pipe.finish(), 30)
        return pipe

    try:
        pipe = asyncio.run(scenario())
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(chunks)
    assert pipe._stream.hasher.hexdigest() == hashlib.sha256(b"".join(chunks)).hexdigest()
    assert pipe._stream.position == 6000
    assert pipe.jobs < len(chunks)  # drained in bursts, not one round trip per chunk


def test_a_failed_write_stops_the_writes_after_it_and_is_raised(tmp_path: Path) -> None:
    path = tmp_path / "partial"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)

    async def scenario() -> None:
        writer = _GatedWriter(fd)
        writer.fail_at = 1
        pipe = _SpoolPipe(writer, BundleStream(), depth=4)
        for chunk in (b"one", b"two", b"three"):
            await pipe.put(chunk)
        writer.gate.set()
        with pytest.raises(OSError, match="No space left"):
            await asyncio.wait_for(pipe.finish(), 30)
        with pytest.raises(OSError, match="No space left"):
            await pipe.put(b"four")
        assert writer.writes == 2  # "three" was dropped, not written after the failure

    try:
        asyncio.run(scenario())
    finally:
        os.close(fd)
    assert path.read_bytes() == b"one"  # a prefix of the upload


def test_a_pipe_whose_job_cannot_start_raises_and_waits_for_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    closed = ThreadPoolExecutor(max_workers=1)
    closed.shutdown()
    monkeypatch.setattr(uploads, "_SPOOL_THREADS", closed)
    fd = os.open(tmp_path / "partial", os.O_WRONLY | os.O_CREAT, 0o600)

    async def scenario() -> None:
        pipe = _SpoolPipe(_SpoolWriter(fd, 0), BundleStream())
        with pytest.raises(RuntimeError, match="shutdown"):
            await pipe.put(b"chunk")
        await asyncio.wait_for(pipe.settle(), 30)  # no job drains: nothing to wait for

    try:
        asyncio.run(scenario())
    finally:
        os.close(fd)
