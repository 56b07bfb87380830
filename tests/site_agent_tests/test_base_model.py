"""The base model's hash: read once per process while its weights files are unchanged."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import site_agent.base_model as base_model
from site_agent.base_model import hash_base_model


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _count_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    reads: list[Path] = []
    read = base_model._update_from_file

    def counted(digest: object, path: Path) -> None:
        reads.append(path)
        read(digest, path)  # type: ignore[arg-type]

    monkeypatch.setattr(base_model, "_update_from_file", counted)
    return reads


def test_the_base_model_is_read_once_per_process_while_its_files_are_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hello and the first hop's trainer ask for the same hash: ~90 MB are read once."""
    weights = _written(tmp_path / "model.safetensors", b"weights")
    reads = _count_reads(monkeypatch)
    monkeypatch.setattr(base_model, "_SETTLED_NS", 0)  # as if written long ago

    assert hash_base_model(tmp_path) == hash_base_model(tmp_path)
    assert hash_base_model(tmp_path) == hashlib.sha256(b"weights").hexdigest()
    assert reads == [weights]

    os.replace(_written(tmp_path / "new", b"changed"), weights)  # another file in its place
    assert hash_base_model(tmp_path) == hashlib.sha256(b"changed").hexdigest()
    assert reads == [weights, weights]


def test_a_weights_file_written_just_now_is_read_again_every_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A timestamp moves once per clock tick: a file rewritten (same size) within the tick of
    # its hashing would keep its stamp, so a file this fresh is never remembered.
    weights = _written(tmp_path / "model.safetensors", b"first")
    reads = _count_reads(monkeypatch)

    first = hash_base_model(tmp_path)
    weights.write_bytes(b"secon")
    assert hash_base_model(tmp_path) == hashlib.sha256(b"secon").hexdigest() != first
    assert reads == [weights, weights]


def _remembering(memory: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A process that has hashed nothing yet, keeping its hashes in ``memory`` (files written
    long ago, as far as the settling rule goes)."""
    monkeypatch.setattr(base_model, "_SETTLED_NS", 0)
    monkeypatch.setattr(base_model, "_computed", {})
    monkeypatch.setattr(base_model, "_memory_file", None)  # put back after the test
    base_model.remember_hashes_in(memory)
    return memory


def test_a_restarted_site_trusts_the_hash_it_kept_while_the_weights_are_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    weights = _written(model / "model.safetensors", b"weights")
    memory = _remembering(tmp_path / "state" / "base-model-hashes.json", monkeypatch)
    reads = _count_reads(monkeypatch)
    digest = hash_base_model(model)
    assert memory.stat().st_mode & 0o777 == 0o600

    monkeypatch.setattr(base_model, "_computed", {})  # a new process of the same site
    assert hash_base_model(model) == digest == hashlib.sha256(b"weights").hexdigest()
    assert reads == [weights]

    monkeypatch.setattr(base_model, "_computed", {})
    os.replace(_written(model / "new", b"changed"), weights)  # changed: its stamp is another
    assert hash_base_model(model) == hashlib.sha256(b"changed").hexdigest()
    assert reads == [weights, weights]


def test_a_kept_hash_others_may_write_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights = _written(tmp_path / "model.safetensors", b"weights")
    memory = _remembering(tmp_path / "base-model-hashes.json", monkeypatch)
    hash_base_model(tmp_path)
    # Someone who may write the file puts another model's hash against these weights' stamp.
    kept = json.loads(memory.read_text())
    memory.write_text(json.dumps(dict.fromkeys(kept, "0" * 64)))
    memory.chmod(0o666)
    monkeypatch.setattr(base_model, "_computed", {})
    reads = _count_reads(monkeypatch)
    assert hash_base_model(tmp_path) == hashlib.sha256(b"weights").hexdigest()
    assert reads == [weights]
