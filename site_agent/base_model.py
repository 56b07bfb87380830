"""The base model's identity: one hash of its weights files, read without importing torch.

The agent says hello (with this hash) before torch and the model are loaded.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

__all__ = ["hash_base_model"]

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
        known = _computed.get(key)
    if known is not None:
        return known
    digest = _hash_single(single) if is_single else _hash_files(files)
    settled = all(started_ns - ctime_ns >= _SETTLED_NS for _, _, _, ctime_ns, _, _ in stamps)
    if settled:
        with _computed_lock:
            _computed[key] = digest
    return digest


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
