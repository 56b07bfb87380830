"""The store keeps its last used bundles in the page cache up to a budget; an upload's writes
reuse the pages of older ones (`CheckpointStore.make_room`)."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

import pytest

from coordinator.console.admin import AdminClient
from coordinator.server import Coordinator
from coordinator.store import CheckpointStore
from protocols.checkpoint import sha256_hex
from tests.coordinator_tests.conftest import ScriptedSite
from tests.coordinator_tests.test_uploads import SPOOLED, _bundle, _outcome, _start, _upload

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _resident_pages(path: Path) -> int:
    """How many of a file's pages are in the page cache (mincore of a private mapping, which
    reads nothing: copy-on-write only to let ctypes take its address)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * pages)()
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        buffer = (ctypes.c_char * size).from_buffer(mapped)
        try:
            if _libc.mincore(ctypes.c_void_p(ctypes.addressof(buffer)), ctypes.c_size_t(size),
                             vector) != 0:  # fmt: skip
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del buffer
    return sum(v & 1 for v in vector)


def _drops_pages(directory: Path) -> bool:
    """Whether this file system gives clean pages up on POSIX_FADV_DONTNEED (tmpfs does not)."""
    probe = directory / "probe"
    probe.write_bytes(os.urandom(64 * 1024))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    dropped = _resident_pages(probe) == 0
    probe.unlink()
    return dropped


def _read_all(store: CheckpointStore, sha256: str) -> bytes:
    async def read() -> bytes:
        return b"".join([f async for _, _, f in store.read_framed(sha256, 0, 4096, _plain)])

    return asyncio.run(read())


def _plain(chunk: bytes, offset: int) -> bytes:
    return chunk


def test_room_is_made_by_dropping_the_least_recently_used_bundles(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store", cache_bytes=3000)
    first, second, third = (store.put(os.urandom(1000)) for _ in range(3))
    assert _read_all(store, first)  # read last: now the most recently used
    assert store.make_room(1500) == [second, third]
    assert store.make_room(1500) == []  # the first and 1500 more fit
    assert store.make_room(2500) == [first]


def test_staged_and_adopted_bundles_count_and_deleted_ones_do_not(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store", cache_bytes=2000)
    data = os.urandom(1000)
    staged = store.stage(data, sha256_hex(data))
    store.place(staged, sha256_hex(data))
    spooled = tmp_path / "spooled"
    other = os.urandom(1000)
    spooled.write_bytes(other)
    store.adopt(spooled, sha256_hex(other))
    gone = store.put(os.urandom(500))
    assert store.delete(gone) == 500
    assert store.make_room(1000) == [sha256_hex(data)]


def test_only_the_last_used_bundles_are_tracked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("coordinator.store._MAX_TRACKED", 2)
    store = CheckpointStore(tmp_path / "store", cache_bytes=10_000)
    first, second, _ = (store.put(os.urandom(1000)) for _ in range(3))
    assert first not in store._cached and store._cached_total == 2000
    assert store.make_room(9000) == [second]


def test_without_a_budget_no_bundle_leaves_the_page_cache(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store")
    store.put(os.urandom(1000))
    assert store.make_room(10**12) == []


def test_a_dropped_bundle_is_out_of_the_page_cache_and_reads_back_whole(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "store", cache_bytes=64 * 1024)
    if not _drops_pages(store.root):
        pytest.skip("this file system keeps its pages on POSIX_FADV_DONTNEED")
    data = os.urandom(64 * 1024)
    sha = store.put(data)
    assert _resident_pages(store.path(sha)) > 0
    assert store.make_room(1) == [sha]
    assert _resident_pages(store.path(sha)) == 0
    assert _read_all(store, sha) == data


def test_an_upload_takes_the_page_cache_of_the_bundle_stored_before_it(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    store = coordinator.engine.store
    if not _drops_pages(store.root):
        pytest.skip("this file system keeps its pages on POSIX_FADV_DONTNEED")
    earlier = store.put(os.urandom(256 * 1024))
    site = sites["site-a"]
    task = _start(admin, site)
    data = _bundle(site, task, SPOOLED, 0.5)  # more than one chunk: streamed through the spool
    store.cache_bytes = len(data) + 1000  # the earlier bundle and the upload do not both fit
    assert _resident_pages(store.path(earlier)) > 0
    assert _outcome(_upload(site, task, data)) == "OK"
    assert _resident_pages(store.path(earlier)) == 0
    assert _resident_pages(store.path(sha256_hex(data))) > 0
