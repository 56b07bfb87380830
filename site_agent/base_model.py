"""The base model's identity: one hash of its weights files, read without importing torch.

The agent says hello (with this hash) before torch and the model are loaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["hash_base_model"]

_HASH_BLOCK_BYTES = 1 << 20


def hash_base_model(directory: Path) -> str:
    """Hashes a base model's weights so sites can prove they train on the same model.

    A single ``model.safetensors`` hashes to the plain sha256 of its bytes (what ``sha256sum``
    prints). Otherwise every ``*.safetensors`` file, or failing that every ``pytorch_model*.bin``
    file, is hashed in name order, each as its name, size and bytes.

    Args:
        directory: The base model directory.

    Returns:
        The lowercase hex sha256 digest.

    Raises:
        FileNotFoundError: If the directory holds no weights file.
    """
    directory = Path(directory)
    single = directory / "model.safetensors"
    if single.is_file():
        digest = hashlib.sha256()
        _update_from_file(digest, single)
        return digest.hexdigest()

    files = sorted(directory.glob("*.safetensors"), key=lambda p: p.name) or sorted(
        directory.glob("pytorch_model*.bin"), key=lambda p: p.name
    )
    if not files:
        raise FileNotFoundError(
            f"no weights files (*.safetensors or pytorch_model*.bin) in {directory}"
        )
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
