"""Checkpoint bundle format: one safetensors file whose metadata carries Baton's manifest.

Both ends use this module without torch: the coordinator validates uploaded bytes here, the site
agent builds bundles from tensors it serialised with safetensors.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors

__all__ = [
    "ADAPTER_CONFIG_KEY",
    "AGGREGATOR",
    "BUNDLE_FORMAT_VERSION",
    "MANIFEST_KEY",
    "Bundle",
    "CheckpointError",
    "CheckpointManifest",
    "TensorSpec",
    "TensorValues",
    "bundle_metadata",
    "hash_prefix",
    "inspect_bundle",
    "inspect_bundle_file",
    "read_bundle",
    "sha256_file",
    "sha256_hex",
    "warm_up",
]

BUNDLE_FORMAT_VERSION = 1
# The producer a round's aggregate names in its manifest: the coordinator made and signed it (no
# site has this name: a site name starts with a letter or a digit).
AGGREGATOR = "@coordinator"
MANIFEST_KEY = "baton.manifest"
ADAPTER_CONFIG_KEY = "baton.adapter_config"
DEFAULT_MAX_BUNDLE_BYTES = 2 * 1024**3
# Reads of a bundle file are this large at most: memory stays flat whatever the bundle's size.
_READ_BYTES = 4 * 1024 * 1024

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
    # A round's aggregate: the contributions it averages (sorted); parent_sha256 is the round's
    # input. Left out of the JSON when empty, so a hop's manifest is what it always was.
    parents: tuple[str, ...] = ()

    def to_json(self) -> str:
        document = asdict(self)
        if self.parents:
            document["parents"] = list(self.parents)
        else:
            del document["parents"]
        return json.dumps(document, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CheckpointManifest:
        try:
            raw = json.loads(text)
            if isinstance(raw, dict) and "parents" in raw:
                raw["parents"] = tuple(str(sha) for sha in raw["parents"])
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
    """One tensor that may move between sites."""

    name: str
    dtype: str  # as safetensors names it: "F32"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorValues:
    """One tensor's values as a bundle holds them: little-endian, row-major (safetensors)."""

    dtype: str  # as safetensors names it: "F32"
    shape: tuple[int, ...]
    data: bytes | memoryview  # a view of the checked bundle's bytes where it lay plainly


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
        import numpy as np  # numpy is imported where values are read, not on import

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


def _check_finite(name: str, dtype: str, raw: bytes | bytearray | memoryview) -> None:
    kind = _FLOAT_DTYPES.get(dtype)
    if kind is None:
        return
    import numpy as np  # numpy is imported where values are read, not on import

    if kind == "bf16":
        # bfloat16 is the top half of a float32: widen by shifting into the high bits.
        values = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        values = np.frombuffer(raw, dtype=kind)
    if not np.isfinite(values).all():
        raise CheckpointError(f"tensor {name!r} holds NaN or infinite values")


def _manifest_and_adapter_config(
    metadata: dict[str, str],
) -> tuple[CheckpointManifest, dict[str, Any]]:
    """The bundle's manifest and adapter config from its safetensors header metadata."""
    if MANIFEST_KEY not in metadata:
        raise CheckpointError(f"checkpoint has no {MANIFEST_KEY!r} manifest")
    manifest = CheckpointManifest.from_json(metadata[MANIFEST_KEY])
    try:
        adapter_config = json.loads(metadata.get(ADAPTER_CONFIG_KEY, "{}"))
    except ValueError as exc:
        raise CheckpointError(f"checkpoint adapter config is not JSON: {exc}") from exc
    return manifest, adapter_config


def inspect_bundle(
    data: bytes,
    *,
    expected_sha256: str | None = None,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
) -> Bundle:
    """Validates a bundle's bytes and returns what it holds (`read_bundle`'s checks, the same
    errors).
    """
    return read_bundle(data, expected_sha256=expected_sha256, max_bytes=max_bytes)[0]


def read_bundle(
    data: bytes,
    *,
    expected_sha256: str | None = None,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
) -> tuple[Bundle, dict[str, TensorValues]]:
    """Validates a bundle's bytes; returns what it holds and each tensor's values as the checks
    read them (by name): a caller that loads the tensors builds them from these, and the bundle
    is parsed once.

    A bundle laid out plainly (`_plain_layout`: what safetensors writes) is checked where it
    lies: its header parsed once, its values read as views of ``data`` (no copy per tensor),
    the finite check one pass per run of same-dtype tensors. Anything else, and any bundle that
    fails a check there, goes through safetensors' own parser: the verdicts and their messages
    are that parser's.

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
    layout = _plain_layout(data)
    if layout is None or not layout[2] or not _runs_finite(data, layout):
        return _read_parsed(data, digest)
    header_len, metadata, entries = layout
    manifest, adapter_config = _manifest_and_adapter_config(metadata)
    view = memoryview(data)[8 + header_len :]
    values = {
        name: TensorValues(dtype=dtype, shape=shape, data=view[start:end])
        for name, dtype, shape, start, end in entries
    }
    return _bundle(digest, len(data), manifest, adapter_config, _specs(values)), values


def warm_up() -> None:
    """Checks a one-value bundle, so that a process's first real check (a hand back's, on the
    handoff's critical path) pays no first-call cost: numpy is imported (50-100 ms of CPU,
    lazily, where values are read) and the parse and finite check run once.
    """
    import numpy as np
    import safetensors.numpy

    manifest = CheckpointManifest(
        task_type="warm-up", base_model_sha256="0" * 64, run_id="-", hop_id="-", producer_site="-"
    )
    values = {"w": np.zeros(1, dtype=np.float32)}
    read_bundle(safetensors.numpy.save(values, metadata=bundle_metadata(manifest, {})))


def _bundle(
    digest: str,
    size: int,
    manifest: CheckpointManifest,
    adapter_config: dict[str, Any],
    specs: list[TensorSpec],
) -> Bundle:
    """A checked bundle's description, its tensors by name."""
    return Bundle(
        sha256=digest,
        size=size,
        manifest=manifest,
        adapter_config=adapter_config,
        tensors=tuple(sorted(specs, key=lambda s: s.name)),
    )


def _specs(values: Mapping[str, TensorValues]) -> list[TensorSpec]:
    return [TensorSpec(name=name, dtype=v.dtype, shape=v.shape) for name, v in values.items()]


def _read_parsed(data: bytes, digest: str) -> tuple[Bundle, dict[str, TensorValues]]:
    """`read_bundle`'s checks after the hash, by safetensors' own parser (values copied out)."""
    try:
        tensors = safetensors.deserialize(bytes(data))
        metadata = _header_metadata(data)
    except (safetensors.SafetensorError, ValueError, struct.error) as exc:
        raise CheckpointError(f"checkpoint is not a valid safetensors file: {exc}") from exc
    manifest, adapter_config = _manifest_and_adapter_config(metadata)
    if not tensors:
        raise CheckpointError("checkpoint holds no tensors")
    values = {
        name: TensorValues(dtype=info["dtype"], shape=tuple(info["shape"]), data=info["data"])
        for name, info in tensors
    }
    _check_all_finite(values)
    return _bundle(digest, len(data), manifest, adapter_config, _specs(values)), values


# Bytes per element of the dtypes `_plain_layout` takes (safetensors knows more: those go to it).
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}  # fmt: skip
# safetensors' own bounds: its header size cap, and its sizes are u64 (usize) products.
_MAX_HEADER_BYTES = 100_000_000
_USIZE_LIMIT = 2**64
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}
_Entry = tuple[str, str, tuple[int, ...], int, int]


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        raise ValueError("duplicate key")
    return document


def _plain_layout(data: bytes) -> tuple[int, dict[str, str], list[_Entry]] | None:
    """Header length, metadata and (name, dtype, shape, start, end) of each tensor by offset
    (``start``, ``end``: from the end of the header), for a bundle safetensors' parser would
    take as it is: a UTF-8 JSON object header with no duplicate key, a string map for
    metadata, and for each tensor exactly a known dtype, a shape and offsets that are
    non-negative integers, with its bytes its shape's size, laid end to end up to the file's
    end. None for anything else (stricter than safetensors: then its parser decides)."""
    if len(data) < 8:
        return None
    (header_len,) = struct.unpack_from("<Q", data)
    if header_len > _MAX_HEADER_BYTES or 8 + header_len > len(data):
        return None
    try:
        text = bytes(data[8 : 8 + header_len]).decode("utf-8")
        header = json.loads(text, object_pairs_hook=_unique_keys) if text[:1] == "{" else None
        if not isinstance(header, dict):
            return None
        metadata = header.pop("__metadata__", None)
        metadata = {} if metadata is None else metadata
        if not isinstance(metadata, dict) or not all(type(v) is str for v in metadata.values()):
            return None
        # JSON may escape a lone surrogate, which Rust's strings refuse.
        "".join([*header, *metadata, *metadata.values()]).encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeError and JSONDecodeError are ValueErrors
        return None
    entries: list[_Entry] = []
    for name, info in header.items():
        if type(info) is not dict or info.keys() != _TENSOR_KEYS:
            return None
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if type(dtype) is not str or dtype not in _ITEM_BYTES:
            return None
        if type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
            return None
        size = 1
        for dim in shape:
            if type(dim) is not int or dim < 0:
                return None
            size *= dim
            if size >= _USIZE_LIMIT:
                return None
        start, end = offsets
        if type(start) is not int or type(end) is not int or not 0 <= start <= end:
            return None
        if (
            size * _ITEM_BYTES[dtype] * 8 >= _USIZE_LIMIT
            or end - start != size * _ITEM_BYTES[dtype]
        ):
            return None
        entries.append((name, dtype, tuple(shape), start, end))
    entries.sort(key=lambda entry: (entry[3], entry[4]))
    at = 0
    for entry in entries:
        if entry[3] != at:
            return None
        at = entry[4]
    if 8 + header_len + at != len(data):
        return None
    return header_len, metadata, entries


def _runs_finite(data: bytes, layout: tuple[int, dict[str, str], list[_Entry]]) -> bool:
    """Whether every float value of a plainly laid out bundle is finite: one check per run of
    tensors of one dtype lying end to end, over the bundle's own bytes (no copy)."""
    header_len, _, entries = layout
    view = memoryview(data)[8 + header_len :]
    index = 0
    while index < len(entries):
        dtype, start, end = entries[index][1], entries[index][3], entries[index][4]
        index += 1
        while index < len(entries) and entries[index][1] == dtype:
            end = entries[index][4]
            index += 1
        try:
            _check_finite("", dtype, view[start:end])
        except CheckpointError:
            return False
    return True


def _check_all_finite(values: Mapping[str, TensorValues]) -> None:
    """`_check_finite` for every tensor, one pass per dtype over the tensors laid end to end
    (an adapter has dozens); a dtype that fails is looked at tensor by tensor for its name."""
    by_dtype: dict[str, list[str]] = {}
    for name, tensor in values.items():
        by_dtype.setdefault(tensor.dtype, []).append(name)
    for dtype, names in by_dtype.items():
        if _FLOAT_DTYPES.get(dtype) is None:
            continue
        try:
            _check_finite(names[0], dtype, b"".join(values[name].data for name in names))
        except CheckpointError:
            for name in names:
                _check_finite(name, dtype, values[name].data)
            raise


def sha256_file(path: Path, *, length: int | None = None) -> str:
    """The sha256 of a file (or of its first `length` bytes), read in bounded blocks."""
    return str(hash_prefix(path, length).hexdigest())


def hash_prefix(path: Path, length: int | None) -> Any:
    """A sha256 object fed with the file's first `length` bytes (all if None), to go on with."""
    digest = hashlib.sha256()
    remaining = path.stat().st_size if length is None else length
    buffer = bytearray(min(_READ_BYTES, max(remaining, 1)))
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while remaining > 0:
            got = fh.readinto(view[: min(len(buffer), remaining)])
            if not got:
                break
            digest.update(view[:got])
            remaining -= got
    return digest


def _tensor_layout(
    path: Path,
) -> tuple[int, dict[str, str], list[tuple[str, str, list[int], int, int]]]:
    """Header length, metadata and (name, dtype, shape, start, end) of each tensor, by offset.

    safetensors' own parser validates the header first (dtypes, shapes against byte lengths,
    contiguous offsets that cover the file exactly); the layout is then read from the same
    header without touching the tensor bytes.
    """
    with safetensors.safe_open(str(path), framework="numpy") as opened:
        opened.keys()
    with path.open("rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(header_len))
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError("checkpoint metadata is not a string map")
    tensors = [
        (name, info["dtype"], list(info["shape"]), *info["data_offsets"])
        for name, info in header.items()
    ]
    return header_len, metadata, sorted(tensors, key=lambda t: t[3])


def _check_finite_file(path: Path, data_start: int, tensors: list[Any]) -> None:
    """Checks every float tensor's values in bounded reads of the file (no whole-file copy)."""
    buffer = bytearray(_READ_BYTES)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        for name, dtype, _shape, start, end in tensors:
            if _FLOAT_DTYPES.get(dtype) is None:
                continue
            fh.seek(data_start + start)
            remaining = end - start
            while remaining > 0:
                want = min(len(buffer), remaining)
                got = fh.readinto(view[:want])
                if got != want:
                    raise CheckpointError(f"checkpoint ends inside tensor {name!r}")
                # Reads are a multiple of 8 bytes until the tensor's end: whole elements only.
                _check_finite(name, dtype, view[:got])
                remaining -= got


def inspect_bundle_file(
    path: Path,
    *,
    expected_sha256: str | None = None,
    max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
    sha256: str | None = None,
) -> Bundle:
    """`inspect_bundle` for a bundle on disk, in bounded memory: the same checks, in order.

    Args:
        path: The bundle file.
        expected_sha256: If given, the bundle must hash to it.
        max_bytes: Size cap; larger bundles are refused before parsing.
        sha256: The file's hash when the caller computed it already (while receiving it);
            otherwise the file is hashed here.

    Raises:
        CheckpointError: On any size, hash, format, manifest or value problem.
    """
    return _inspect_file(
        path,
        digest=lambda size: sha256 or sha256_file(path),
        check_values=lambda header_len, tensors: _check_finite_file(path, 8 + header_len, tensors),
        expected_sha256=expected_sha256,
        max_bytes=max_bytes,
    )


_Layout = list[tuple[str, str, list[int], int, int]]


def _inspect_file(
    path: Path,
    *,
    digest: Callable[[int], str],
    check_values: Callable[[int, _Layout], None],
    expected_sha256: str | None,
    max_bytes: int,
) -> Bundle:
    """The bundle file checks in their order (size, hash, format, manifest, values): how the
    hash is had (``digest(size)``) and the values checked (``check_values(header_len,
    tensors)``) are the caller's."""
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"checkpoint is {size} bytes, over the {max_bytes}-byte cap")
    found = digest(size)
    if expected_sha256 is not None and found != expected_sha256:
        raise CheckpointError(
            f"checkpoint hash mismatch: expected {expected_sha256}, received bytes hash to {found}"
        )
    try:
        header_len, metadata, tensors = _tensor_layout(path)
    except (safetensors.SafetensorError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise CheckpointError(f"checkpoint is not a valid safetensors file: {exc}") from exc
    manifest, adapter_config = _manifest_and_adapter_config(metadata)
    if not tensors:
        raise CheckpointError("checkpoint holds no tensors")
    check_values(header_len, tensors)
    specs = [
        TensorSpec(name=name, dtype=dtype, shape=tuple(shape))
        for name, dtype, shape, _, _ in tensors
    ]
    return _bundle(found, size, manifest, adapter_config, specs)
