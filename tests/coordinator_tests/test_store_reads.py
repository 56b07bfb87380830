"""Stored bundles are read for downloads off the event loop, one chunk ahead, and closed at once."""

from __future__ import annotations

import asyncio
import os
from contextlib import aclosing
from pathlib import Path

from coordinator.store import CheckpointStore


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_chunks_are_read_from_any_offset_to_the_end(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    data = os.urandom(10_000)
    sha = store.put(data)

    async def read(offset: int) -> list[tuple[int, bytes]]:
        return [chunk async for chunk in store.read_chunks(sha, offset, 4096)]

    chunks = asyncio.run(read(0))
    assert [o for o, _ in chunks] == [0, 4096, 8192]
    assert b"".join(c for _, c in chunks) == data
    assert b"".join(c for _, c in asyncio.run(read(5000))) == data[5000:]
    assert asyncio.run(read(len(data))) == []


def test_a_download_cut_short_closes_its_file(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    sha = store.put(os.urandom(50_000))

    async def first_chunk_only() -> bytes:
        async with aclosing(store.read_chunks(sha, 0, 1024)) as chunks:
            async for _, chunk in chunks:
                return chunk
        raise AssertionError("no chunk")

    before = _open_descriptors()
    assert len(asyncio.run(first_chunk_only())) == 1024
    assert _open_descriptors() == before
