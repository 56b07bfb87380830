"""The tabular model as a class importable by name (FLARE's persistor rebuilds it from its path)."""

from __future__ import annotations

import torch

N_FEATURES = 13


class TabularNet(torch.nn.Module):
    """``Linear(13, 1)``: Baton's ``tabular`` logistic model, with the same tensor names."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(N_FEATURES, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.linear(features)
        return logits
