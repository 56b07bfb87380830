"""The shared optimisation loop and metrics: schedule, epochs, proximal term, AUROC, macro-F1."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from site_agent.tasks import HopHyperparameters, TaskSpec
from site_agent.tasks._loop import learning_rate_factor, proximal_anchors, train
from site_agent.tasks._metrics import auroc, classification_metrics, macro_f1


def test_learning_rate_warms_up_then_decays_linearly() -> None:
    factors = [learning_rate_factor(step, 6, 2) for step in range(6)]

    assert factors == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    assert [learning_rate_factor(step, 4, 0) for step in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_constant_schedule_keeps_the_rate_after_warmup() -> None:
    factors = [learning_rate_factor(step, 5, 2, "constant") for step in range(5)]

    assert factors == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0])


def test_epochs_override_steps_and_count_partial_batches() -> None:
    assert HopHyperparameters(steps=7).total_steps(100) == 7
    # 10 examples in batches of 4: 3 batches per pass.
    assert HopHyperparameters(epochs=2, batch_size=4).total_steps(10) == 6
    assert HopHyperparameters(epochs=0.5, batch_size=4).total_steps(10) == 2


@pytest.mark.parametrize(
    "field",
    [
        {"learning_rate": 0.0},
        {"steps": 0},
        {"epochs": -1.0},
        {"batch_size": 0},
        {"weight_decay": float("nan")},
        {"warmup_steps": -1},
        {"proximal_mu": -0.1},
        {"lr_schedule": "cosine"},
    ],
)
def test_invalid_hyperparameters_are_refused(field: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        HopHyperparameters(**field)  # type: ignore[arg-type]


def test_task_spec_checks_its_task_type_labels_and_options() -> None:
    with pytest.raises(ValueError, match="unknown task type"):
        TaskSpec("segmentation", labels=("a", "b"))
    with pytest.raises(ValueError, match="at least two"):
        TaskSpec("tabular", labels=("only",))
    with pytest.raises(ValueError, match="no labels"):
        TaskSpec("causal-lm", labels=("a", "b"))
    with pytest.raises(ValueError, match="JSON-able"):
        TaskSpec("tabular", labels=("0", "1"), options={"mean": object()})
    assert TaskSpec("tabular", labels=["0", "1"]).labels == ("0", "1")  # type: ignore[arg-type]


def _quadratic_run(mu: float, anchor_value: float) -> torch.Tensor:
    """Minimises (w - 10)^2 from w = anchor_value, optionally pulled back to the start."""
    weight = torch.nn.Parameter(torch.tensor([anchor_value]))
    hp = HopHyperparameters(
        learning_rate=0.1, steps=400, batch_size=1, max_grad_norm=0, lr_schedule="constant",
        proximal_mu=mu,
    )  # fmt: skip
    train(
        trainable=[weight],
        batch_loss=lambda index: ((weight - 10.0) ** 2).sum(),
        num_examples=1,
        hyperparameters=hp,
        device=torch.device("cpu"),
        fp16=False,
        anchors=proximal_anchors([weight], hp, has_incoming=True),
        progress=None,
        should_cancel=None,
    )
    return weight.detach()


def test_proximal_term_pulls_towards_the_incoming_weights() -> None:
    # Minimum of (w - 10)^2 + mu/2 (w - 0)^2 is at 20 / (2 + mu).
    free = _quadratic_run(0.0, 0.0)
    pulled = _quadratic_run(2.0, 0.0)

    assert float(free) == pytest.approx(10.0, abs=1e-2)
    assert float(pulled) == pytest.approx(5.0, abs=1e-2)


def test_the_run_keeps_the_last_steps_graph_for_its_caller_to_free() -> None:
    # Freeing the last step's autograd graph (~0.3 ms for MiniLM) as `train` returned fell
    # between a hop's last step and its hand back; a hop now frees it after the hand back.
    weight = torch.nn.Parameter(torch.tensor([2.0]))
    losses: list[float] = []
    run = train(
        trainable=[weight],
        batch_loss=lambda index: ((weight - 10.0) ** 2).sum(),
        num_examples=1,
        hyperparameters=HopHyperparameters(steps=3, batch_size=1, max_grad_norm=0),
        device=torch.device("cpu"),
        fp16=False,
        anchors=None,
        progress=lambda step, total, loss: losses.append(loss),
        should_cancel=None,
    )

    assert run.last_step is not None and run.last_step.grad_fn is not None
    assert float(run.last_step) == pytest.approx(losses[-1])
    assert dataclasses.replace(run, last_step=None) == run  # not part of the run's figures


def test_no_anchors_without_incoming_weights_or_mu() -> None:
    weight = torch.nn.Parameter(torch.zeros(2))
    with_mu = HopHyperparameters(proximal_mu=0.5)

    assert proximal_anchors([weight], with_mu, has_incoming=False) is None
    assert proximal_anchors([weight], HopHyperparameters(), has_incoming=True) is None
    anchors = proximal_anchors([weight], with_mu, has_incoming=True)
    assert anchors is not None and torch.equal(anchors[0], weight.detach())


def test_macro_f1_averages_over_labels_that_occur() -> None:
    # Label 2 never occurs, so it does not drag the mean down.
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 3) == pytest.approx((2 / 3 + 0.8) / 2)
    assert macro_f1([0, 1], [0, 1], 3) == 1.0


def test_macro_f1_and_auroc_match_scikit_learn() -> None:
    rng = random.Random(0)
    targets = [rng.randrange(2) for _ in range(300)]
    scores = [round(t * 0.8 + rng.gauss(0, 1), 1) for t in targets]  # rounding makes ties
    predictions = [int(s > 0.4) for s in scores]

    assert auroc(targets, scores) == pytest.approx(roc_auc_score(targets, scores))
    assert macro_f1(targets, predictions, 2) == pytest.approx(
        f1_score(targets, predictions, average="macro")
    )


def test_auroc_is_left_out_when_only_one_class_is_present() -> None:
    metrics = classification_metrics(
        total_loss=1.0, targets=[1, 1], predictions=[1, 0], positive_scores=[0.2, 0.1],
        num_labels=2,
    )  # fmt: skip

    assert "auroc" not in metrics
    assert metrics["accuracy"] == 0.5
    assert metrics["loss"] == 0.5


def _adam_run(hyperparameters: HopHyperparameters) -> torch.Tensor:
    weight = torch.nn.Parameter(torch.tensor([0.0, 3.0]))
    train(
        trainable=[weight],
        batch_loss=lambda index: ((weight - 10.0) ** 2).sum(),
        num_examples=1,
        hyperparameters=hyperparameters,
        device=torch.device("cpu"),
        fp16=False,
        anchors=None,
        progress=None,
        should_cancel=None,
    )
    return weight.detach()


def test_adam_beta2_is_the_optimizers_second_moment_decay() -> None:
    hp = HopHyperparameters(learning_rate=0.5, steps=20, batch_size=1, max_grad_norm=0,
                            lr_schedule="constant", adam_beta2=0.6)  # fmt: skip
    reference = torch.nn.Parameter(torch.tensor([0.0, 3.0]))
    optimizer = torch.optim.AdamW([reference], lr=0.5, weight_decay=0.0, betas=(0.9, 0.6))
    for _ in range(20):
        optimizer.zero_grad()
        ((reference - 10.0) ** 2).sum().backward()
        optimizer.step()

    torch.testing.assert_close(_adam_run(hp), reference.detach())
    default = dataclasses.replace(hp, adam_beta2=HopHyperparameters().adam_beta2)
    assert not torch.allclose(_adam_run(default), reference.detach(), atol=1e-3)
