"""The base model's identity: one hash of its weights files, read without importing torch.

The agent says hello (with this hash) before torch and the model are loaded. `baton-site serve`
also keeps the hashes it computed in its state directory (`remember_hashes_in`), so that a
restarted site does not read its ~90 MB of weights again before its hello (~0.14 s of CPU).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
import time
from pathlib import Path

__all__ = ["hash_base_model", "remember_hashes_in"]

_HASH_BLOCK_BYTES = 1 << 20

# Hashes computed in this process, by weights files and their stat: the hello and the trainer
# ask for the same hash a few seconds apart (reading ~90 MB twice on a site's first hop). Any
# write to a file changes its ctime (which no user can set), so a changed file is hashed again;
# as in git's "racy clean" rule, a file changed less than _SETTLED_NS before its hashing began
# is never remembered (a timestamp only moves once per clock tick, a few milliseconds).
_SETTLED_NS = 2_000_000_000
_FileStamp = tuple[str, int, int, int, int, int]
_computed: dict[tuple[str, tuple[_FileStamp, ...]], str] = {}
_computed_lock = threading.Lock()
# Where hashes are kept across this site's starts (None: in this process only), by the same key.
_memory_file: Path | None = None
_MEMORY_ENTRIES = 32  # the newest ones kept: a site has a base model or a few


def remember_hashes_in(path: Path | None) -> None:
    """Keeps the hashes this process computes in ``path`` (a JSON file, mode 0600, in the
    site's state directory) and trusts the ones found there for files with the same stamp
    (name, size, mtime, ctime, inode, device: a write to a file changes its ctime, which no
    user can set). A file that is not this user's own, or that others may write, is ignored
    (hashes are then computed, and not kept); ``None``: this process only."""
    global _memory_file
    _memory_file = path


def hash_base_model(directory: Path) -> str:
    """Hashes a base model's weights so sites can prove they train on the same model.

    A single ``model.safetensors`` hashes to the plain sha256 of its bytes (what ``sha256sum``
    prints). Otherwise every ``*.safetensors`` file, or failing that every ``pytorch_model*.bin``
    file, is hashed in name order, each as its name, size and bytes. Computed once per process
    while the files are unchanged (same size, mtime, ctime and inode).

    Args:
        directory: The base model directory.

    Returns:
        The lowercase hex sha256 digest.

    Raises:
        FileNotFoundError: If the directory holds no weights file.
    """
    directory = Path(directory)
    single = directory / "model.safetensors"
    is_single = single.is_file()
    files = (
        [single]
        if is_single
        else sorted(directory.glob("*.safetensors"), key=lambda p: p.name)
        or sorted(directory.glob("pytorch_model*.bin"), key=lambda p: p.name)
    )
    if not files:
        raise FileNotFoundError(
            f"no weights files (*.safetensors or pytorch_model*.bin) in {directory}"
        )
    started_ns = time.time_ns()
    stamps = tuple(_stamp(path) for path in files)
    key = (str(directory.resolve()), stamps)
    with _computed_lock:
        known = _computed.get(key) or _remembered(key)
        if known is not None:
            _computed[key] = known
            return known
    digest = _hash_single(single) if is_single else _hash_files(files)
    settled = all(started_ns - ctime_ns >= _SETTLED_NS for _, _, _, ctime_ns, _, _ in stamps)
    if settled:
        with _computed_lock:
            _computed[key] = digest
            _remember(key, digest)
    return digest


def _memory_key(key: tuple[str, tuple[_FileStamp, ...]]) -> str:
    return json.dumps([key[0], [list(stamp) for stamp in key[1]]], separators=(",", ":"))


def _read_memory(path: Path) -> dict[str, str]:
    """The hashes kept in ``path``; none if it is missing, unreadable, malformed, not this
    user's or writable by others."""
    try:
        with path.open("rb") as stream:
            info = os.fstat(stream.fileno())
            if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return {}
            entries = json.loads(stream.read())
    except (OSError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {
        k: v
        for k, v in entries.items()
        if isinstance(k, str) and isinstance(v, str) and len(v) == 64
        and all(c in "0123456789abcdef" for c in v)
    }  # fmt: skip


def _remembered(key: tuple[str, tuple[_FileStamp, ...]]) -> str | None:
    if _memory_file is None:
        return None
    return _read_memory(_memory_file).get(_memory_key(key))


def _remember(key: tuple[str, tuple[_FileStamp, ...]], digest: str) -> None:
    """Adds a hash to the memory file (written aside, then renamed over it); a failure to
    write only means the next start hashes again."""
    path = _memory_file
    if path is None:
        return
    entries = _read_memory(path)
    entries.pop(_memory_key(key), None)
    entries[_memory_key(key)] = digest
    kept = dict(list(entries.items())[-_MEMORY_ENTRIES:])
    aside = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as stream:
            json.dump(kept, stream)
        os.replace(aside, path)
    except OSError:
        aside.unlink(missing_ok=True)


def _stamp(path: Path) -> _FileStamp:
    stat = os.stat(path)
    return (path.name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev)


def _hash_single(path: Path) -> str:
    digest = hashlib.sha256()
    _update_from_file(digest, path)
    return digest.hexdigest()


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        name = path.name.encode("utf-8")
        # Length-prefixed fields, so that no two file sets produce the same byte stream.
        digest.update(len(name).to_bytes(8, "big"))
        digest.update(name)
        digest.update(path.stat().st_size.to_bytes(8, "big"))
        _update_from_file(digest, path)
    return digest.hexdigest()


def _update_from_file(digest: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as stream:
        while block := stream.read(_HASH_BLOCK_BYTES):
            digest.update(block)
