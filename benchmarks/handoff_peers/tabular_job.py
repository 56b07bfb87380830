"""The tabular job every peer runs: 13 features, ``Linear(13, 1)``, BCE, a few SGD steps per visit.

Pure Python data generation (the same rows in every peer's interpreter); torch only for training.
Each visit reports wall-clock timestamps (``time.time()``) of its training start and end, so that
every peer's handoff is measured the same way: end of one site's training to the start of the next
site's training.
"""

from __future__ import annotations

import random
import time
from typing import Any

N_FEATURES = 13
ROWS = 200


def site_rows(site_index: int, seed: int = 0) -> list[tuple[list[float], int]]:
    """A site's rows: features around a site-specific shift, a noisy linear label."""
    rng = random.Random(seed * 1000 + site_index)
    rows = []
    for _ in range(ROWS):
        x = [rng.gauss(0.3 * site_index, 1.0) for _ in range(N_FEATURES)]
        score = sum(x[: N_FEATURES // 2]) - sum(x[N_FEATURES // 2 :]) + rng.gauss(0, 1)
        rows.append((x, int(score > 0)))
    return rows


def csv_text(site_index: int, seed: int = 0) -> str:
    header = ",".join(f"f{i}" for i in range(N_FEATURES)) + ",label"
    body = [",".join(f"{v:.4f}" for v in x) + f",{y}" for x, y in site_rows(site_index, seed)]
    return "\n".join([header, *body]) + "\n"


def new_model() -> Any:
    import torch

    try:
        from tabular_net import TabularNet
    except ImportError:  # inside the Flower app's package
        from batonbench.tabular_net import TabularNet

    torch.manual_seed(0)
    return TabularNet()


def train_visit(model: Any, site_index: int, steps: int, batch_size: int = 16) -> dict[str, float]:
    """Trains `model` in place for `steps` steps; returns the visit's timestamps."""
    import torch

    started = time.time()
    rows = site_rows(site_index)
    features = torch.tensor([x for x, _ in rows])
    labels = torch.tensor([[float(y)] for _, y in rows])
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0)
    generator = torch.Generator().manual_seed(site_index)
    for _ in range(steps):
        index = torch.randint(0, len(rows), (batch_size,), generator=generator)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model(features[index]), labels[index]
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return {"train_start": started, "train_end": time.time(), "loss": float(loss.detach())}
