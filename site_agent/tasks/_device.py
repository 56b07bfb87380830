"""Where training runs: device choice, CPU threads, mixed precision and seeded RNG isolation."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch


def resolve_device(device: str | None) -> torch.device:
    """``None`` picks CUDA when available, otherwise CPU; an unavailable CUDA device is refused."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def set_num_threads(num_threads: int | None) -> None:
    """Sets torch's intra-op CPU threads (process-wide) when a count is given."""
    if num_threads is None:
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    torch.set_num_threads(num_threads)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA devices that support it, fp16 on older ones, no autocast on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """Mixed precision for the forward pass, or nothing."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def forked_rng(device: torch.device) -> AbstractContextManager[object]:
    """Seeding inside a hop must not change the caller's global RNG streams."""
    if device.type == "cuda":
        index = device.index
        devices = [index if index is not None else torch.cuda.current_device()]
        return torch.random.fork_rng(devices=devices, device_type="cuda")
    return torch.random.fork_rng(devices=[])


def synchronize(device: torch.device) -> None:
    """Waits for queued CUDA work, so that wall-clock timestamps mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class ComputeDevice:
    """A resolved training device and the mixed precision its forward passes run in."""

    device: torch.device
    autocast_dtype: torch.dtype | None

    @classmethod
    def resolve(cls, device: str | None) -> ComputeDevice:
        """See ``resolve_device``; bf16 (or fp16) autocast on CUDA, none on CPU."""
        resolved = resolve_device(device)
        return cls(resolved, autocast_dtype(resolved))

    @property
    def fp16(self) -> bool:
        """Whether forward passes run under fp16 autocast (the optimizer then scales the loss)."""
        return self.autocast_dtype == torch.float16

    def logits(
        self, model: torch.nn.Module, inputs: Mapping[str, torch.Tensor], **options: Any
    ) -> torch.Tensor:
        """The model's logits for a batch, moved to the device and run under autocast."""
        batch = {name: values.to(self.device) for name, values in inputs.items()}
        with autocast(self.device, self.autocast_dtype):
            logits: torch.Tensor = model(**batch, **options).logits
        return logits

    def forked_rng(self) -> AbstractContextManager[object]:
        """See ``forked_rng``."""
        return forked_rng(self.device)
