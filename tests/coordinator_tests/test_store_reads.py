"""Stored bundles are read for downloads off the event loop, one chunk ahead, and closed at once."""

from __future__ import annotations

import asyncio
import os
import threading
from contextlib import aclosing
from pathlib import Path

from coordinator.store import CheckpointStore


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def _framed(chunk: bytes, offset: int) -> bytes:
    """A stand-in for a download's message framing: the chunk's offset, then its bytes."""
    return offset.to_bytes(8, "big") + chunk


def test_chunks_are_read_and_framed_from_any_offset_to_the_end(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    data = os.urandom(10_000)
    sha = store.put(data)

    async def read(offset: int) -> list[tuple[int, int, bytes]]:
        return [chunk async for chunk in store.read_framed(sha, offset, 4096, _framed)]

    chunks = asyncio.run(read(0))
    assert [(o, n) for o, n, _ in chunks] == [(0, 4096), (4096, 4096), (8192, 10_000 - 8192)]
    assert [int.from_bytes(f[:8], "big") for _, _, f in chunks] == [0, 4096, 8192]
    assert b"".join(f[8:] for _, _, f in chunks) == data
    resumed = asyncio.run(read(5000))
    assert [(o, n) for o, n, _ in resumed] == [(5000, 4096), (9096, 10_000 - 9096)]
    assert b"".join(f[8:] for _, _, f in resumed) == data[5000:]
    assert asyncio.run(read(len(data))) == []


def test_chunks_are_framed_off_the_event_loop(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    sha = store.put(os.urandom(10_000))
    framed_on: set[int] = set()

    def frame(chunk: bytes, offset: int) -> bytes:
        framed_on.add(threading.get_ident())
        return chunk

    async def read() -> int:
        async for _ in store.read_framed(sha, 0, 4096, frame):
            pass
        return threading.get_ident()

    loop_thread = asyncio.run(read())
    assert framed_on and loop_thread not in framed_on


def test_a_download_cut_short_closes_its_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    sha = store.put(os.urandom(50_000))

    async def first_chunk_only() -> bytes:
        async with aclosing(store.read_framed(sha, 0, 1024, _framed)) as chunks:
            async for _, _, framed in chunks:
                return framed
        raise AssertionError("no chunk")

    before = _open_descriptors()
    assert len(asyncio.run(first_chunk_only())) == 8 + 1024
    assert _open_descriptors() == before
