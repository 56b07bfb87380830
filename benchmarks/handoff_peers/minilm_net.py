"""The MiniLM job's adapter as a module FLARE's persistor can rebuild by class path.

FLARE's cyclic workflow starts from a server-side ``torch.nn.Module`` and relays its state dict
from client to client. To relay what Baton relays (LoRA adapter + head, not the 90 MB base
model), the module holds exactly the peft adapter's tensors under their own names.
"""

from __future__ import annotations

import torch
from minilm_job import initial_adapter


class MiniLMAdapter(torch.nn.Module):
    """A fresh seeded adapter of ``base_model``; ``state_dict()`` has peft's adapter keys."""

    def __init__(self, base_model: str) -> None:
        super().__init__()
        for key, tensor in initial_adapter(base_model).items():
            *path, leaf = key.split(".")
            module: torch.nn.Module = self
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(tensor))
