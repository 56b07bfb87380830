"""The site agent reads a hop's hyperparameters from the wire through the one model."""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

from protocols.approval import ApprovalBundle
from protocols.hyperparameter_messages import to_message
from protocols.hyperparameters import HopHyperparameters
from protocols.v1 import baton_pb2 as pb
from site_agent.agent import HopFailure, SiteAgent
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.settings import SiteSettings
from site_agent.tasks import HopOutcome, TaskSpec, TensorSpec
from tests.hyperparameter_bounds import out_of_bounds

LABELS = ("0", "1")


class _Reached(Exception):
    """Raised by the recording trainer once the agent handed it a hop."""


class _RecordingTrainer:
    """Records what the agent asks it to train with, then stops the hop."""

    def __init__(self) -> None:
        self.hyperparameters: list[HopHyperparameters] = []

    @property
    def base_model_sha256(self) -> str:
        return ""

    def model_sha256(self, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        return "a" * 64

    def trainable_state(self, spec: TaskSpec, dataset: RegisteredDataset) -> tuple[TensorSpec, ...]:
        return ()

    def run_hop(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        hyperparameters: HopHyperparameters,
        incoming: Mapping[str, torch.Tensor] | None,
        progress: object = None,
        should_cancel: object = None,
    ) -> HopOutcome:
        self.hyperparameters.append(hyperparameters)
        raise _Reached

    def evaluate(self, *args: object) -> dict[str, float]:
        raise AssertionError("not evaluated")


class _Beat:
    """What `_train_hop` uses of a hop's heartbeat."""

    cancelled = threading.Event()

    def phase(self, name: str) -> None:
        pass

    def training_step(self, step: int, total: int, loss: float) -> None:
        pass


def _agent(tmp_path: Path) -> SiteAgent:
    rng = random.Random(3)
    lines = ["age,label"] + [f"{rng.gauss(55, 8):.3f},{rng.randint(0, 1)}" for _ in range(20)]
    (tmp_path / "heart.csv").write_text("\n".join(lines) + "\n")
    register_dataset(tmp_path / "data", "heart", tmp_path / "heart.csv", task_type="tabular")
    return SiteAgent(SiteSettings(
        coordinator="localhost:1", ca_certificate=tmp_path / "ca.crt",
        certificate=tmp_path / "site.crt", private_key=tmp_path / "site.key",
        data_dir=tmp_path / "data", require_approval=False,
    ))  # fmt: skip


def _task(message: pb.HopHyperparameters, bounds: Mapping[str, tuple[float, float]]) -> pb.HopTask:
    bundle = ApprovalBundle("tabular", "heart", "", labels=LABELS, bounds=dict(bounds))
    return pb.HopTask(
        run_id="r", hop_id="h", lease_token="t", task_type="tabular", dataset="heart",
        labels=LABELS, hyperparameters=message, approval_bundle_json=bundle.canonical_json(),
    )  # fmt: skip


def _train(agent: SiteAgent, task: pb.HopTask) -> None:
    agent._train_hop(None, task, _Beat())  # type: ignore[arg-type]


def test_the_trainer_gets_exactly_the_hyperparameters_the_task_carries(tmp_path: Path) -> None:
    agent, trainer = _agent(tmp_path), _RecordingTrainer()
    agent._trainers["tabular"] = trainer  # type: ignore[assignment]
    sent = HopHyperparameters(
        learning_rate=0.02, epochs=1.5, batch_size=4, warmup_steps=2, max_grad_norm=0.5,
        seed=9, proximal_mu=0.1, weight_decay=0.01, lr_schedule="constant",
    )  # fmt: skip
    with pytest.raises(_Reached):
        _train(agent, _task(to_message(sent), {}))
    assert trainer.hyperparameters == [sent]


@pytest.mark.parametrize(("name", "value"), out_of_bounds())
def test_the_agent_refuses_hyperparameters_outside_the_models_bounds(
    tmp_path: Path, name: str, value: float
) -> None:
    values = HopHyperparameters().model_dump() | {name: value}
    try:
        message = pb.HopHyperparameters(**values)
    except ValueError:
        pytest.skip(f"{name}={value} cannot be carried by its wire type")
    agent, trainer = _agent(tmp_path), _RecordingTrainer()
    agent._trainers["tabular"] = trainer  # type: ignore[assignment]
    with pytest.raises(HopFailure, match=f"^invalid hyperparameters: {name}: ") as refused:
        _train(agent, _task(message, {}))
    assert refused.value.code == "bad-task"
    assert trainer.hyperparameters == []


def test_the_agent_refuses_hyperparameters_outside_the_approved_bounds(tmp_path: Path) -> None:
    agent, trainer = _agent(tmp_path), _RecordingTrainer()
    agent._trainers["tabular"] = trainer  # type: ignore[assignment]
    message = to_message(HopHyperparameters(learning_rate=0.05))
    with pytest.raises(HopFailure, match=r"learning_rate=0.05 is outside") as refused:
        _train(agent, _task(message, {"learning_rate": (1e-4, 1e-2)}))
    assert refused.value.code == "not-approved"
    assert trainer.hyperparameters == []
