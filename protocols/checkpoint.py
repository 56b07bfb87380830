"""Checkpoint bundle format: one safetensors file whose metadata carries Baton's manifest.

Both ends use this module without torch: the coordinator validates uploaded bytes here, the site
agent builds bundles from tensors it serialised with safetensors.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import safetensors

__all__ = [
    "ADAPTER_CONFIG_KEY",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_KEY",
    "Bundle",
    "CheckpointError",
    "CheckpointManifest",
    "TensorSpec",
    "bundle_metadata",
    "inspect_bundle",
    "sha256_hex",
]

BUNDLE_FORMAT_VERSION = 1
MANIFEST_KEY = "baton.manifest"
ADAPTER_CONFIG_KEY = "baton.adapter_config"
DEFAULT_MAX_BUNDLE_BYTES = 2 * 1024**3

# safetensors dtype name -> numpy dtype used to check values are finite (None: integer, skip).
_FLOAT_DTYPES: dict[str, str | None] = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "bf16"}


class CheckpointError(ValueError):
    """A checkpoint bundle is malformed, inconsistent or holds non-finite values."""


@dataclass(frozen=True)
class CheckpointManifest:
    """What a bundle claims about itself; signed over by its hash."""

    task_type: str
    base_model_sha256: str
    run_id: str
    hop_id: str
    producer_site: str
    parent_sha256: str = ""
    created_at: str = ""
    format_version: int = BUNDLE_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CheckpointManifest:
        try:
            raw = json.loads(text)
            manifest = cls(**raw)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint manifest is malformed: {exc}") from exc
        if manifest.format_version != BUNDLE_FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint bundle format {manifest.format_version} is not supported "
                f"(this Baton reads format {BUNDLE_FORMAT_VERSION})"
            )
        return manifest


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Bundle:
    """A validated checkpoint bundle."""

    sha256: str
    size: int
    manifest: CheckpointManifest
    adapter_config: dict[str, Any]
    tensors: tuple[TensorSpec, ...] = field(default_factory=tuple)

    @property
    def parameter_count(self) -> int:
        return sum(int(np.prod(t.shape, dtype=np.int64)) for t in self.tensors)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bundle_metadata(
    manifest: CheckpointManifest, adapter_config: Mapping[str, Any]
) -> dict[str, str]:
    """The safetensors ``__metadata__`` entries a site writes into a bundle."""
    return {
        MANIFEST_KEY: manifest.to_json(),
        ADAPTER_CONFIG_KEY: json.dumps(dict(adapter_config), sort_keys=True),
    }


def _header_metadata(data: bytes) -> dict[str, str]:
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise CheckpointError("checkpoint metadata is not a string map")
    return metadata


def _check_finite(name: str, dtype: str, raw: bytes | bytearray) -> None:
    kind = _FLOAT_DTYPES.get(dtype)
    if kind is None:
        return
    if kind == "bf16":
        # bfloat16 is the top half of a float32: widen by shifting into the high bits.
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(raw, dtype=kind)
    if not np.isfinite(values).all():
        raise CheckpointError(f"tensor {name!r} holds NaN or infinite values")


def inspect_bundle(
    data: bytes,
    *,
    expected_sha256: str | None = None,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
) -> Bundle:
    """Validates a bundle's bytes and returns what it holds.

    Args:
        data: The whole bundle.
        expected_sha256: If given, the bundle must hash to it.
        max_bytes: Size cap; larger bundles are refused before parsing.

    Raises:
        CheckpointError: On any size, hash, format, manifest or value problem.
    """
    if len(data) > max_bytes:
        raise CheckpointError(f"checkpoint is {len(data)} bytes, over the {max_bytes}-byte cap")
    digest = sha256_hex(data)
    if expected_sha256 is not None and digest != expected_sha256:
        raise CheckpointError(
            f"checkpoint hash mismatch: expected {expected_sha256}, received bytes hash to {digest}"
        )
    try:
        tensors = safetensors.deserialize(bytes(data))
        metadata = _header_metadata(data)
    except (safetensors.SafetensorError, ValueError, struct.error) as exc:
        raise CheckpointError(f"checkpoint is not a valid safetensors file: {exc}") from exc
    if MANIFEST_KEY not in metadata:
        raise CheckpointError(f"checkpoint has no {MANIFEST_KEY!r} manifest")
    manifest = CheckpointManifest.from_json(metadata[MANIFEST_KEY])
    try:
        adapter_config = json.loads(metadata.get(ADAPTER_CONFIG_KEY, "{}"))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint adapter config is not JSON: {exc}") from exc
    if not tensors:
        raise CheckpointError("checkpoint holds no tensors")
    specs = []
    for name, info in tensors:
        _check_finite(name, info["dtype"], info["data"])
        specs.append(TensorSpec(name=name, dtype=info["dtype"], shape=tuple(info["shape"])))
    return Bundle(
        sha256=digest,
        size=len(data),
        manifest=manifest,
        adapter_config=adapter_config,
        tensors=tuple(sorted(specs, key=lambda s: s.name)),
    )
