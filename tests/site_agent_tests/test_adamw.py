"""The site's AdamW: torch's numbers, without torch.optim's import of torch._dynamo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from site_agent.tasks._adamw import AdamW


def _twin_parameters() -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    torch.manual_seed(3)
    shapes = [(4, 3), (3,), (2, 2)]
    ours = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, theirs


def test_steps_are_bit_for_bit_torchs_adamw_with_a_changing_learning_rate() -> None:
    ours, theirs = _twin_parameters()
    settings = {"lr": 0.05, "weight_decay": 0.1, "betas": (0.9, 0.7), "eps": 1e-6}
    mine = AdamW(ours, **settings)  # type: ignore[arg-type]
    reference = torch.optim.AdamW(theirs, **settings)  # type: ignore[arg-type]
    for step in range(12):
        scale = 1.0 - step / 12  # a decaying schedule, set per step as the hop loop does
        for optimizer in (mine, reference):
            for group in optimizer.param_groups:
                group["lr"] = settings["lr"] * scale  # type: ignore[operator]
        for params, optimizer in ((ours, mine), (theirs, reference)):
            optimizer.zero_grad()
            # The last parameter gets no gradient every third step: skipped, as torch skips it.
            used = params if step % 3 else params[:2]
            sum(((p - 1.0) ** 3).sum() for p in used).backward()  # type: ignore[union-attr]
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            optimizer.step()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), f"step {step}"
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(mine.state[a]["exp_avg_sq"], reference.state[b]["exp_avg_sq"])
        assert torch.equal(mine.state[a]["step"], reference.state[b]["step"])


def test_defaults_are_torchs_and_zero_grad_drops_the_gradients() -> None:
    ours, theirs = _twin_parameters()
    mine, reference = AdamW(ours), torch.optim.AdamW(theirs)
    group = mine.param_groups[0]
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert group[key] == reference.param_groups[0][key], key
    for p in ours:
        p.grad = torch.ones_like(p)
    mine.zero_grad()
    assert all(p.grad is None for p in ours)


def test_a_grad_scaler_unscales_and_skips_an_inf_step_as_with_torchs_adamw() -> None:
    ours, theirs = _twin_parameters()
    pairs = ((ours, AdamW(ours, lr=0.1)), (theirs, torch.optim.AdamW(theirs, lr=0.1)))
    scalers = [torch.amp.GradScaler("cpu", init_scale=64.0) for _ in pairs]
    for step in range(4):
        for (params, optimizer), scaler in zip(pairs, scalers, strict=True):
            optimizer.zero_grad()
            loss = sum((p**2).sum() for p in params)
            if step == 2:
                loss = loss * float("inf")  # an overflowing step: skipped, the scale lowered
            scaler.scale(loss).backward()  # type: ignore[union-attr]
            scaler.unscale_(optimizer)  # type: ignore[arg-type]
            scaler.step(optimizer)  # type: ignore[arg-type]
            scaler.update()
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), f"step {step}"
    assert scalers[0].get_scale() == scalers[1].get_scale() < 64.0


def test_a_tabular_sites_hop_never_imports_torch_dynamo(tmp_path: Path) -> None:
    """torch.optim's optimizers import torch._dynamo (~2.4 s of CPU) when built or stepped: a
    tabular site's start and hop no longer pay it."""
    rows = ["a,b,label"] + [f"{i % 7},{(i * 3) % 5},{i % 2}" for i in range(40)]
    (tmp_path / "rows.csv").write_text("\n".join(rows) + "\n")
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from site_agent.registry import register_dataset\n"
        "from site_agent.tasks import HopHyperparameters, TaskSpec, create_trainer\n"
        "from site_agent.tasks._loop import warm_up_optimizer\n"
        f"tmp = Path({str(tmp_path)!r})\n"
        "warm_up_optimizer()\n"
        "dataset = register_dataset(tmp / 'registry', 'rows', tmp / 'rows.csv',\n"
        "                           task_type='tabular', seed=1)\n"
        "trainer = create_trainer('tabular', base_model_dir=None, device='cpu')\n"
        "spec = TaskSpec('tabular', labels=('0', '1'))\n"
        "hp = HopHyperparameters(steps=4, batch_size=8, max_grad_norm=1.0)\n"
        "outcome = trainer.run_hop(spec, dataset, hp, None)\n"
        "assert outcome.metrics, outcome\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'sympy'))))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
