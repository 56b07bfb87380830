"""A coordinator's start removes what a crash of the last one left half-written: the store's
temporary files and partial uploads no live lease holds; nothing else."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import pytest

from coordinator.engine.spool import UploadSpool
from coordinator.server import build_server
from coordinator.store import CheckpointStore
from tests.conftest import LoopThread, Pki
from tests.coordinator_tests.conftest import coordinator_settings

HOUR = 3600.0


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _file(path: Path, size: int, age: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    when = time.time() - age
    os.utime(path, (when, when))
    return path


def test_the_store_sweeps_only_its_own_temporary_files_from_before(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "checkpoints")
    sha = _sha("bundle")
    shard = store.root / sha[:2]
    stale = [_file(shard / f".{sha}.k3_9zq0a.tmp", 100, HOUR),
             _file(shard / f".{sha}.abcdefgh.tmp", 20, 60)]  # fmt: skip
    kept = [
        _file(shard / sha, 10, HOUR),  # a stored bundle
        _file(shard / f".{sha}.newer123.tmp", 5, -HOUR),  # written after the start
        _file(store.root / "00" / f".{sha}.k3_9zq0a.tmp", 5, HOUR),  # another shard's name
        _file(shard / f".{sha}.short.tmp", 5, HOUR),  # not a name the store makes
        _file(shard / f".{sha}.k3_9zq0a.tmp.keep", 5, HOUR),
        _file(shard / "notes.tmp", 5, HOUR),
        _file(store.root / f".{sha}.k3_9zq0a.tmp", 5, HOUR),  # not in a shard
    ]
    assert store.sweep_temporary(time.time()) == (2, 120)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert store.sweep_temporary(time.time()) == (0, 0)


def test_a_start_removes_what_a_crashed_coordinator_left_half_written(
    pki: Pki,
    tmp_path: Path,
    loop_thread: LoopThread,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = coordinator_settings(pki, tmp_path / "state", database_url=database_url)
    sha = _sha("half-written")
    shard = settings.checkpoint_dir / sha[:2]
    staged = _file(shard / f".{sha}.a1b2c3d4.tmp", 4096, 60)  # a crash between write and rename
    stored = _file(shard / sha, 10, HOUR)
    spool = UploadSpool(settings.state_dir / "uploads")
    partial = _file(spool.path("ab" * 16, "lease", _sha("upload")), 1000, 60)  # no such hop
    foreign = _file(settings.state_dir / "uploads" / "README", 7, HOUR)
    caplog.set_level(logging.INFO, logger="coordinator.engine.uploads")

    server = loop_thread.run(build_server(settings))
    try:
        assert not staged.exists() and not partial.exists()
        assert stored.exists() and foreign.exists()
    finally:
        loop_thread.run(server.stop(0))
    assert (
        "start-up: removed 1 stale temporary files (4096 bytes) from the checkpoint store and "
        "1 abandoned partial uploads (1000 bytes) from the upload spool"
    ) in caplog.text
