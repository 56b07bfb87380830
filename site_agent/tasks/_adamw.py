"""AdamW as torch computes it, without the ``torch.optim.Optimizer`` wrapper around it.

Every ``torch.optim`` optimizer imports ``torch._dynamo`` (and sympy) the first time it is built
or stepped: ``add_param_group``, ``step`` and ``zero_grad`` are wrapped in dynamo guards even
in eager mode. That import is about 2.4 s of CPU on a small machine, more than a tabular site
needs for everything else before its first hop. This class keeps the state AdamW keeps and calls
torch's own functional update, ``torch.optim.adamw.adamw``, with the arguments
``torch.optim.AdamW.step`` passes it, so the numbers are torch's (a test steps both side by
side and compares them bit for bit). Only what the site's loop uses is here: one parameter
group, no closure, no amsgrad, no state_dict (an optimizer never leaves its hop), and
``zero_grad`` only drops gradients.

A LoRA site still imports ``torch._dynamo`` (transformers' masking code does); a tabular site no
longer does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.adamw import adamw


class AdamW:
    """One parameter group optimised with torch's AdamW update.

    Duck-types what the hop loop, ``torch.nn.utils.clip_grad_norm_`` and ``torch.amp.GradScaler``
    use: ``param_groups`` (``lr``, ``betas``, ``eps``, ``weight_decay``), ``state``, ``step``
    and ``zero_grad``.
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        group: dict[str, Any] = {
            "params": list(params),
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
        }
        self.param_groups: list[dict[str, Any]] = [group]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        """Drops every gradient (torch's default, ``set_to_none=True``: the loop's only use)."""
        for parameter in self.param_groups[0]["params"]:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One AdamW update of every parameter that has a gradient (as ``torch.optim.AdamW``)."""
        group = self.param_groups[0]
        params: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        exp_avgs: list[torch.Tensor] = []
        exp_avg_sqs: list[torch.Tensor] = []
        steps: list[torch.Tensor] = []
        has_complex = False
        for parameter in group["params"]:
            if parameter.grad is None:
                continue
            if parameter.grad.is_sparse:
                raise RuntimeError("AdamW does not support sparse gradients")
            has_complex |= torch.is_complex(parameter)
            state = self.state.get(parameter)
            if state is None:  # as torch: the step count on the CPU, moments like the parameter
                state = self.state[parameter] = {
                    "step": torch.tensor(0.0, dtype=_step_dtype(), device="cpu"),
                    "exp_avg": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                }
            params.append(parameter)
            grads.append(parameter.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            foreach=None,  # torch's default choice: foreach on CUDA, one tensor at a time on CPU
            capturable=False,
            differentiable=False,
            fused=None,
            grad_scale=None,
            found_inf=None,
            has_complex=has_complex,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def _step_dtype() -> torch.dtype:
    """The step count's dtype, as torch's optimizers pick it."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
