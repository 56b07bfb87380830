"""Moving trainable state between sites: checking incoming tensors, copying outgoing ones."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NoReturn

import numpy as np
import safetensors
import safetensors.torch
import torch

from protocols.checkpoint import TensorValues
from site_agent.tasks._spec import TENSOR_DTYPE, TensorSpec

_KEYS_SHOWN_IN_ERRORS = 20


# safetensors dtype names -> torch dtypes (those safetensors' own torch loader knows).
_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class FlatTensors(dict[str, torch.Tensor]):
    """Named float32 CPU tensors laid end to end in name order in one contiguous buffer,
    ``flat``, as a bundle lays out an adapter's tensors: copied, checked, loaded and written
    in one operation each, not one per tensor (an adapter has dozens, each operation ~0.15 ms
    of torch's dispatch on a loaded host). Each value is a view of ``flat``; read-only (a
    copy, ``dict(...)``, pickled or deep-copied, is a plain dict)."""

    def __init__(self, flat: torch.Tensor, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        if flat.dtype != torch.float32 or flat.device.type != "cpu" or flat.dim() != 1:
            raise ValueError("flat tensors live in one 1-d float32 CPU buffer")
        self.shapes = tuple((name, tuple(shape)) for name, shape in shapes)
        layout, numel = _layout(self.shapes)
        if numel != flat.numel() or not flat.is_contiguous():
            raise ValueError("flat tensors fill their buffer exactly")
        self.flat = flat
        base = flat.storage_offset()
        # One view per tensor, made in one torch call each (``split`` then ``view`` is two).
        super().__init__(
            (name, flat.as_strided(shape, strides, base + offset))
            for name, shape, strides, offset in layout
        )

    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("flat tensors are read-only: copy them with dict(...) to change them")

    __setitem__ = __delitem__ = __ior__ = _read_only  # type: ignore[assignment]
    clear = pop = popitem = setdefault = update = _read_only  # type: ignore[assignment]

    def __reduce__(self) -> tuple[type[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor]]]:
        return dict, (dict(self),)


@functools.lru_cache(maxsize=16)
def _layout(
    shapes: tuple[tuple[str, tuple[int, ...]], ...],
) -> tuple[tuple[tuple[str, tuple[int, ...], tuple[int, ...], int], ...], int]:
    """Where each named tensor of `FlatTensors` lies in its buffer (name, shape, contiguous
    strides, offset), and the buffer's length; checked and worked out once per layout (an
    adapter's is the same every hop)."""
    names = [name for name, _ in shapes]
    if names != sorted(set(names)):
        raise ValueError("flat tensors are laid out in name order, each name once")
    layout, at = [], 0
    for name, shape in shapes:
        strides = tuple(math.prod(shape[k + 1 :]) for k in range(len(shape)))
        layout.append((name, shape, strides, at))
        at += math.prod(shape)
    return tuple(layout), at


def flat_parameters(slots: Mapping[str, torch.Tensor]) -> FlatTensors | None:
    """Moves trainable parameters' values into one buffer (`FlatTensors`, in name order), each
    parameter now a view of it: the same values, the same Parameter objects (modules and an
    optimizer keep theirs), so that a hop's input is loaded and its output copied out in one
    operation. None (nothing moved) unless every one is a contiguous float32 CPU tensor."""
    names = sorted(slots)
    if not names or any(
        slots[name].dtype != torch.float32
        or slots[name].device.type != "cpu"
        or not slots[name].is_contiguous()
        for name in names
    ):
        return None
    sizes = [slots[name].numel() for name in names]
    flat = torch.empty(sum(sizes), dtype=torch.float32)
    with torch.no_grad():
        torch.cat([slots[name].detach().reshape(-1) for name in names], out=flat)
    state = FlatTensors(flat, [(name, tuple(slots[name].shape)) for name in names])
    for name in names:
        slots[name].data = state[name]
    return state


def load_flat(slab: FlatTensors, incoming: Mapping[str, torch.Tensor]) -> bool:
    """Loads ``incoming`` into ``slab``'s buffer in one copy if it is laid out the same way
    (`FlatTensors` or `PackedValues` of the same names and shapes), after the finite check
    ``checked_state`` makes; False (nothing loaded) if it is not. `PackedValues` are copied
    from the bundle's own bytes: no tensor is made of them."""
    if isinstance(incoming, PackedValues):
        if incoming.shapes != slab.shapes:
            return False
        source = incoming.array
    elif isinstance(incoming, FlatTensors) and incoming.shapes == slab.shapes:
        source = incoming.flat.numpy()
    else:
        return False
    if not np.isfinite(source).all():
        checked_state(incoming, dict(slab.shapes))  # raises, naming the tensors
    np.copyto(slab.flat.detach().numpy(), source)  # see _plain_copy
    torch.autograd.graph.increment_version(slab.flat)  # as copy_ would
    return True


class PackedValues(Mapping[str, torch.Tensor]):
    """A checked bundle's float32 tensors where they lie in its bytes: end to end in name
    order (as safetensors writes an adapter), ``array`` one read-only float32 array over
    them. A prepared hop loads them into its buffer straight from there (`load_flat`): no
    tensor, view or copy is made of them on the next site's start (~0.4 ms of a MiniLM
    adapter's 26 tensors). Read as a mapping (a hop that was not prepared, a tabular or
    cross-validated one), they are copied out once, as writable `FlatTensors`."""

    def __init__(self, array: np.ndarray, shapes: Sequence[tuple[str, tuple[int, ...]]]) -> None:
        self.array = array
        self.shapes = tuple((name, tuple(shape)) for name, shape in shapes)
        self._names = frozenset(name for name, _ in self.shapes)
        self._tensors: FlatTensors | None = None

    def tensors(self) -> FlatTensors:
        """The tensors, copied out of the bundle's bytes (once)."""
        if self._tensors is None:
            self._tensors = FlatTensors(torch.from_numpy(self.array.copy()), self.shapes)
        return self._tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors()[name]

    def __iter__(self) -> Iterator[str]:
        return iter([name for name, _ in self.shapes])

    def __len__(self) -> int:
        return len(self.shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __reduce__(self) -> tuple[type[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor]]]:
        return dict, (dict(self.tensors()),)


def _packed(values: Mapping[str, TensorValues], names: Sequence[str]) -> PackedValues | None:
    """``values`` (float32, ``names`` sorted) as `PackedValues` if they are non-empty views of
    one ``bytes`` object (immutable: what was checked is what loads) lying end to end in name
    order; None if not (they are copied tensor by tensor)."""
    views = [values[name].data for name in names]
    owner = views[0].obj if isinstance(views[0], memoryview) else None
    if type(owner) is not bytes or not all(
        isinstance(view, memoryview) and view.obj is owner and view.nbytes and view.c_contiguous
        for view in views
    ):
        return None
    start = at = _address(views[0])  # type: ignore[arg-type]
    for view in views:
        if _address(view) != at:  # type: ignore[arg-type]
            return None
        at += view.nbytes  # type: ignore[union-attr]
    buffer = memoryview(owner)  # type: ignore[arg-type]
    offset = start - _address(buffer)
    packed = np.frombuffer(buffer, dtype="<f4", count=(at - start) // 4, offset=offset)
    return PackedValues(packed, [(name, values[name].shape) for name in names])


def _address(view: memoryview) -> int:
    """Where a non-empty memoryview's first byte lies."""
    address: int = np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0]
    return address


def _plain_copy(flat: torch.Tensor) -> torch.Tensor:
    """A copy of a 1-d float32 CPU buffer made by numpy, on the calling thread.

    An adapter's buffer (~75k values for MiniLM r=8) is over torch's grain size, so ``clone``
    and ``copy_`` split it across the intra-op (OpenMP) threads and wait for all of them at a
    barrier: when the other core is busy (the coordinator, another site) the copy waits for a
    worker to be scheduled, 29 ms at the 95th percentile on a loaded 2-core host against 30 us
    for this copy. The hand back and the incoming load are on the handoff's critical path."""
    return torch.from_numpy(flat.detach().numpy().copy())


def tensors_from_values(
    values: Mapping[str, TensorValues],
) -> Mapping[str, torch.Tensor] | None:
    """CPU tensors (writable copies) of a checked bundle's values, as `safetensors.torch.load`
    builds them from the same bytes, without parsing the bundle again; None where it would
    not build them so (a dtype torch has no name for here, a big-endian host). An adapter of
    float32 tensors (as they travel) comes as `PackedValues` where they lie end to end in
    the bundle's bytes (as safetensors writes them; copied out when read as tensors), else
    as `FlatTensors`."""
    if sys.byteorder != "little":
        return None
    if values and all(value.dtype == "F32" for value in values.values()):
        names = sorted(values)
        packed = _packed(values, names)
        if packed is not None:
            return packed
        flat = torch.empty(sum(len(values[name].data) for name in names) // 4, dtype=torch.float32)
        out, at = flat.numpy(), 0
        for name in names:  # one copy of the bytes, from where the checks read them
            part = np.frombuffer(values[name].data, dtype="<f4")
            out[at : at + part.size] = part
            at += part.size
        return FlatTensors(flat, [(name, values[name].shape) for name in names])
    tensors: dict[str, torch.Tensor] = {}
    for name, value in values.items():
        dtype = _TORCH_DTYPES.get(value.dtype)
        if dtype is None:
            return None
        if not value.data:  # frombuffer takes no empty buffer
            tensors[name] = torch.empty(value.shape, dtype=dtype)
        else:
            buffer = bytearray(value.data)
            tensors[name] = torch.frombuffer(buffer, dtype=dtype).reshape(value.shape)
    return tensors


def checked_state(
    incoming: Mapping[str, torch.Tensor], expected_shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Incoming tensors as CPU float32, after checking names, shapes and finiteness."""
    unexpected = sorted(set(incoming) - set(expected_shapes))
    missing = sorted(set(expected_shapes) - set(incoming))
    if unexpected or missing:
        raise ValueError(
            f"incoming tensors do not fit this model: unexpected keys {preview(unexpected)}, "
            f"missing keys {preview(missing)}"
        )
    state: dict[str, torch.Tensor] = {}
    for key in sorted(incoming):
        tensor = incoming[key]
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            raise ValueError(f"incoming value {key!r} is not a floating-point tensor")
        if tuple(tensor.shape) != expected_shapes[key]:
            raise ValueError(
                f"incoming tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"expected {expected_shapes[key]}"
            )
        state[key] = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not all_finite(incoming[key] for key in state):
        non_finite = [key for key in state if not is_finite(incoming[key])]
        raise ValueError(f"incoming tensors have non-finite values in {preview(non_finite)}")
    return state


def outgoing(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous float32 copies, refused if training left a non-finite value.

    One operation per tensor for the copy and one check per dtype for the values (this runs
    between a hop's last step and its hand back); tensors are looked at one by one only to
    name those that are not finite. `FlatTensors` are copied and checked in one operation
    each, and come out as `FlatTensors`."""
    if isinstance(state, FlatTensors):
        copied = FlatTensors(_plain_copy(state.flat), state.shapes)
        if np.isfinite(copied.flat.numpy()).all():
            return copied
        state = dict(state)
    tensors = {
        key: tensor.detach().to(
            device="cpu", dtype=torch.float32, copy=True, memory_format=torch.contiguous_format
        )
        for key, tensor in sorted(state.items())
    }
    if all_finite(tensors.values()):
        return tensors
    non_finite = sorted(key for key, tensor in tensors.items() if not is_finite(tensor))
    if non_finite:
        raise ValueError(
            f"training diverged: trained tensors have non-finite values in {preview(non_finite)}"
        )
    return tensors


def serialized(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """``safetensors.torch.save(tensors, metadata)``, byte for byte, for a hop's hand back.

    Dense contiguous CPU tensors that each own their whole storage (what ``outgoing`` makes)
    go to safetensors' serializer by pointer, without the checks its torch ``save`` makes
    for any state dict (shared or overlapping storage, sparse layouts, with ctypes and numpy
    views per tensor): 2 ms of a MiniLM hand back's ~4 ms at the finishing site. Anything
    else, or a safetensors without that serializer, takes ``save`` itself. `FlatTensors`
    (views of one buffer that do not overlap) go by pointer with no check per tensor.
    """
    spec = getattr(safetensors, "TensorSpec", None)
    specs = {}
    if isinstance(tensors, FlatTensors):
        if spec is None:  # ``save`` refuses views of one storage: each its own copy
            return safetensors.torch.save({k: v.clone() for k, v in tensors.items()},
                                          metadata=dict(metadata))  # fmt: skip
        for name, tensor in tensors.items():
            specs[name] = spec(dtype="float32", shape=list(tensor.shape),
                               data_ptr=tensor.data_ptr(), data_len=tensor.numel() * 4)  # fmt: skip
        return bytes(safetensors.serialize(specs, metadata=dict(metadata)))
    seen: set[int] = set()
    for name, tensor in tensors.items():
        size = _ITEM_BYTES.get(tensor.dtype)
        pointer = tensor.data_ptr()
        if (
            spec is None
            or size is None
            or tensor.device.type != "cpu"
            or tensor.layout != torch.strided
            or not tensor.is_contiguous()
            or tensor.storage_offset() != 0
            or tensor.untyped_storage().nbytes() != tensor.numel() * size
            or (pointer in seen and tensor.numel())
        ):
            return safetensors.torch.save(dict(tensors), metadata=dict(metadata))
        seen.add(pointer)
        specs[name] = spec(dtype=str(tensor.dtype).removeprefix("torch."), shape=list(tensor.shape),
                           data_ptr=pointer, data_len=tensor.numel() * size)  # fmt: skip
    # The tensors (in ``tensors``) stay alive while the serializer reads their memory.
    return bytes(safetensors.serialize(specs, metadata=dict(metadata)))


# Bytes per element of the dtypes ``serialized`` hands over by pointer.
_ITEM_BYTES = {torch.float32: 4, torch.float64: 8, torch.float16: 2, torch.bfloat16: 2}


def tensor_specs(state: Mapping[str, torch.Tensor]) -> tuple[TensorSpec, ...]:
    """Names and shapes of a state dict as it travels (float32), sorted by name."""
    return tuple(
        TensorSpec(name=key, dtype=TENSOR_DTYPE, shape=tuple(int(d) for d in state[key].shape))
        for key in sorted(state)
    )


def is_finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all())


# The dtypes whose CPU values numpy reads as they are (``Tensor.numpy()`` shares the memory).
_NUMPY_DTYPES = (torch.float32, torch.float64, torch.float16)


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether every value of every tensor is finite: one check per dtype and device over
    the tensors laid end to end, not two operations per tensor (an adapter has dozens, and
    each operation costs torch's dispatch, ~0.15 ms on a loaded host).

    CPU tensors numpy can read are checked by numpy, on the calling thread: torch runs an
    operation over an adapter's ~75,000 values (its concatenation, ``isfinite``, ``all``) on
    its intra-op thread pool, and on a loaded host each of those waits for a pool thread to be
    scheduled (8.5 ms instead of 0.5 ms for a MiniLM adapter at load 5 on 2 cores).
    """
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor.detach().reshape(-1))
    for (dtype, device), group in groups.items():
        if device.type == "cpu" and dtype in _NUMPY_DTYPES:
            values = np.concatenate([t.numpy() for t in group]) if len(group) > 1 else None
            if not np.isfinite(group[0].numpy() if values is None else values).all():
                return False
        elif not is_finite(torch.cat(group)):
            return False
    return True


def preview(keys: Sequence[str]) -> str:
    """A key list for an error message, cut after a few entries."""
    if len(keys) <= _KEYS_SHOWN_IN_ERRORS:
        return str(list(keys))
    shown = list(keys[:_KEYS_SHOWN_IN_ERRORS])
    return f"{shown} and {len(keys) - _KEYS_SHOWN_IN_ERRORS} more"
