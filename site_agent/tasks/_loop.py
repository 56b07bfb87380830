"""The optimisation loop every task shares: schedule, proximal term, clipping, cancellation."""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch

from site_agent.tasks._adamw import AdamW
from site_agent.tasks._device import synchronize
from site_agent.tasks._spec import CancelCheck, HopCancelled, HopHyperparameters, ProgressCallback

logger = logging.getLogger(__name__)

# train_loss reports the mean of the last few step losses: the end of the hop, smoothed.
_TRAIN_LOSS_WINDOW = 10


@dataclass(frozen=True)
class TrainingRun:
    """How the optimisation went."""

    train_loss: float  # mean data loss (no proximal term) over the last steps
    steps: int
    started_ns: int
    finished_ns: int
    # The last step's loss, and with it that step's autograd graph (hundreds of nodes for
    # MiniLM, ~0.3 ms to free): freed when the run is, not as ``train`` returns, so that a hop
    # can keep it until its hand back is answered (`HopOutcome.leftovers`).
    last_step: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def metrics(self, num_examples: int) -> dict[str, float]:
        """The ``train_*`` metrics every hop reports, for a train split of ``num_examples``."""
        return {
            "train_loss": self.train_loss,
            "train_steps": float(self.steps),
            "train_examples": float(num_examples),
        }


def warm_up_optimizer() -> None:
    """Builds and steps a throw-away AdamW once, so a hop's first step pays no first-call costs
    (torch's functional update and its kernels); done while the site starts, not in the handoff.
    No random number generator is touched."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    parameter.grad = torch.zeros(1)
    AdamW([parameter], lr=1e-3).step()


def train(
    *,
    trainable: Sequence[torch.nn.Parameter],
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    num_examples: int,
    hyperparameters: HopHyperparameters,
    device: torch.device,
    fp16: bool,
    anchors: Sequence[torch.Tensor] | None,
    progress: ProgressCallback | None,
    should_cancel: CancelCheck | None,
    optimizer: AdamW | None = None,
) -> TrainingRun:
    """Runs the optimizer steps of one hop with AdamW (torch's update; see ``_adamw``).

    Args:
        trainable: The parameters to optimise, in a fixed order.
        batch_loss: Maps a CPU tensor of example indices to the float32 mean data loss of that
            batch; the caller has put its model in training mode.
        num_examples: Size of the train split the indices are drawn from.
        hyperparameters: Optimisation settings; ``seed`` fixes the batch order.
        device: Where the parameters live.
        fp16: Whether the forward pass runs under fp16 autocast (needs loss scaling).
        anchors: Detached copies of ``trainable`` at the start of the hop (the incoming
            weights) for the proximal term, or None for no proximal term.
        progress: Called as ``progress(step, total_steps, loss)`` after each optimizer step.
        should_cancel: Checked before each optimizer step.
        optimizer: An AdamW built ahead over exactly ``trainable`` that has not stepped (see
            ``idle_optimizer``); its settings are set from ``hyperparameters`` here. None:
            built here.

    Returns:
        Loss summary, step count and wall-clock start/end.

    Raises:
        HopCancelled: If ``should_cancel`` returned True.
        ValueError: If the loss or gradient norm stops being finite.
    """
    hp = hyperparameters
    total = hp.total_steps(num_examples)
    params = list(trainable)
    if optimizer is None:
        optimizer = AdamW(
            params, lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=(0.9, hp.adam_beta2)
        )
    else:
        _configure(optimizer, params, hp)
    scaler = torch.amp.GradScaler(device.type) if fp16 else None
    # GradScaler reads only param_groups and calls step(): what this AdamW has.
    as_scaled = cast(torch.optim.Optimizer, optimizer)
    mu = hp.proximal_mu if anchors is not None else 0.0
    batches = batch_indices(num_examples, hp.batch_size, hp.seed)
    recent: deque[float] = deque(maxlen=_TRAIN_LOSS_WINDOW)
    # Checked before the start is taken: a provisional hop waits in it for its lease.
    if should_cancel is not None and should_cancel():
        raise HopCancelled(f"hop cancelled after 0 of {total} steps")
    started_ns = time.time_ns()
    last_step: torch.Tensor | None = None
    for step in range(total):
        if step and should_cancel is not None and should_cancel():
            raise HopCancelled(f"hop cancelled after {step} of {total} steps")
        factor = learning_rate_factor(step, total, hp.warmup_steps, hp.lr_schedule)
        for group in optimizer.param_groups:
            group["lr"] = hp.learning_rate * factor

        loss = batch_loss(next(batches))
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise ValueError(
                f"training diverged: loss is {loss_value} at step {step + 1} of {total}"
            )
        if mu > 0 and anchors is not None:
            loss = loss + (mu / 2) * _squared_distance(params, anchors)

        optimizer.zero_grad()
        if scaler is not None:
            torch.autograd.backward(scaler.scale(loss))
            if hp.max_grad_norm > 0:
                scaler.unscale_(as_scaled)
                torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
            # The scaler skips steps with inf/nan gradients and lowers its scale.
            scaler.step(as_scaled)
            scaler.update()
        else:
            torch.autograd.backward(loss)
            if hp.max_grad_norm > 0:
                norm = float(torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm))
                if not math.isfinite(norm):
                    raise ValueError(
                        f"training diverged: gradient norm is {norm} at step {step + 1} of {total}"
                    )
            optimizer.step()

        recent.append(loss_value)
        last_step = loss
        if progress is not None:
            progress(step + 1, total, loss_value)
    synchronize(device)
    finished_ns = time.time_ns()
    return TrainingRun(
        train_loss=sum(recent) / len(recent),
        steps=total,
        started_ns=started_ns,
        finished_ns=finished_ns,
        last_step=last_step,
    )


def idle_optimizer(trainable: Sequence[torch.nn.Parameter]) -> AdamW:
    """An AdamW over ``trainable``, built before the hop's settings are known (a prepared hop):
    ``train`` sets them. AdamW keeps no state until its first step, so this is the optimizer
    ``train`` would have built."""
    return AdamW(list(trainable))


def _configure(
    optimizer: AdamW, params: Sequence[torch.nn.Parameter], hp: HopHyperparameters
) -> None:
    """Gives an idle AdamW built ahead the hop's settings; refuses one that stepped or holds
    other parameters (it would not be the optimizer a fresh hop builds)."""
    groups = optimizer.param_groups
    if (
        optimizer.state
        or len(groups) != 1
        or [id(p) for p in groups[0]["params"]] != [id(p) for p in params]
    ):
        raise ValueError("a prepared optimizer must be idle and hold exactly the hop's parameters")
    groups[0].update(lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=(0.9, hp.adam_beta2))


def proximal_anchors(
    trainable: Sequence[torch.nn.Parameter], hyperparameters: HopHyperparameters, has_incoming: bool
) -> list[torch.Tensor] | None:
    """Copies of the starting weights when the hop has a proximal term, else None."""
    if not has_incoming or hyperparameters.proximal_mu <= 0:
        return None
    return [parameter.detach().clone() for parameter in trainable]


def _squared_distance(
    params: Sequence[torch.nn.Parameter], anchors: Sequence[torch.Tensor]
) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float32, device=params[0].device)
    for parameter, anchor in zip(params, anchors, strict=True):
        total = total + (parameter.float() - anchor.float()).pow(2).sum()
    return total


def batch_indices(count: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of indices: a fresh seeded permutation per epoch; the last may be short."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            yield order[start : start + batch_size]


def learning_rate_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str = "linear"
) -> float:
    """Multiplier for 0-based optimizer step ``step``: linear warmup, then linear decay to 0
    (``linear``) or a constant rate (``constant``)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return (total_steps - step) / (total_steps - warmup_steps)
