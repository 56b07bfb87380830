"""What a hop's start keeps from the hop before (parses of identical bytes, a dataset's
targets, a source's identity) never stands in for a check: each is still made on every task."""

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
from site_agent import hop_runner, registry, task_checks
from site_agent.agent import HopFailure, SiteAgent
from site_agent.examples import TextExample
from site_agent.registry import RegisteredDataset, register_dataset
from site_agent.settings import SiteSettings
from site_agent.tasks import HopOutcome, LoraSettings, TaskSpec, TensorSpec

LABELS = ("0", "1")


class _Reached(Exception):
    """Raised by the recording trainer once the agent handed it a hop."""


class _RecordingTrainer:
    """Records the hops and preparations the agent hands it; stops each hop there."""

    def __init__(self) -> None:
        self.hyperparameters: list[HopHyperparameters] = []
        self.prepared: list[RegisteredDataset] = []

    @property
    def base_model_sha256(self) -> str:
        return ""

    def model_sha256(self, spec: TaskSpec, dataset: RegisteredDataset) -> str:
        return "a" * 64

    def trainable_state(self, spec: TaskSpec, dataset: RegisteredDataset) -> tuple[TensorSpec, ...]:
        return ()

    def prepare(self, spec: TaskSpec, dataset: RegisteredDataset, seed: int) -> None:
        self.prepared.append(dataset)

    def run_hop(
        self,
        spec: TaskSpec,
        dataset: RegisteredDataset,
        hyperparameters: HopHyperparameters,
        incoming: Mapping[str, torch.Tensor] | None,
        progress: object = None,
        should_cancel: object = None,
        *,
        defer_validation: bool = False,
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


def _agent(tmp_path: Path, *, require_approval: bool = False) -> SiteAgent:
    rng = random.Random(3)
    lines = ["age,label"] + [f"{rng.gauss(55, 8):.3f},{rng.randint(0, 1)}" for _ in range(20)]
    (tmp_path / "heart.csv").write_text("\n".join(lines) + "\n")
    register_dataset(tmp_path / "data", "heart", tmp_path / "heart.csv", task_type="tabular")
    agent = SiteAgent(SiteSettings(
        coordinator="localhost:1", ca_certificate=tmp_path / "ca.crt",
        certificate=tmp_path / "site.crt", private_key=tmp_path / "site.key",
        data_dir=tmp_path / "data", require_approval=require_approval,
        state_dir=tmp_path / "state",
    ))  # fmt: skip
    agent._trainers["tabular"] = _RecordingTrainer()  # type: ignore[assignment]
    return agent


def _trainer(agent: SiteAgent) -> _RecordingTrainer:
    trainer = agent._trainers["tabular"]
    assert isinstance(trainer, _RecordingTrainer)
    return trainer


def _bundle(bounds: Mapping[str, tuple[float, float]] | None = None) -> ApprovalBundle:
    return ApprovalBundle("tabular", "heart", "", labels=LABELS, bounds=dict(bounds or {}))


def _task(
    bundle: ApprovalBundle,
    hyperparameters: HopHyperparameters | None = None,
    *,
    dataset: str = "heart",
) -> pb.HopTask:
    return pb.HopTask(
        run_id="r", hop_id="h", lease_token="t", task_type="tabular", dataset=dataset,
        labels=LABELS, hyperparameters=to_message(hyperparameters or HopHyperparameters()),
        approval_bundle_json=bundle.canonical_json(),
    )  # fmt: skip


def _start(agent: SiteAgent, task: pb.HopTask) -> None:
    with pytest.raises(_Reached):
        agent._train_hop(None, task, _Beat())  # type: ignore[arg-type]


def _refused(agent: SiteAgent, task: pb.HopTask, code: str, match: str) -> None:
    with pytest.raises(HopFailure, match=match) as refused:
        agent._train_hop(None, task, _Beat())  # type: ignore[arg-type]
    assert refused.value.code == code


def test_a_runs_bundle_and_hyperparameters_are_parsed_once_for_its_hops(tmp_path: Path) -> None:
    agent = _agent(tmp_path)
    task = _task(_bundle(), HopHyperparameters(learning_rate=0.02))
    task_checks._approval_bundle.cache_clear()
    hop_runner._hyperparameters.cache_clear()

    for _ in range(3):
        _start(agent, task)

    assert task_checks._approval_bundle.cache_info().misses == 1
    assert hop_runner._hyperparameters.cache_info().misses == 1
    assert _trainer(agent).hyperparameters == [HopHyperparameters(learning_rate=0.02)] * 3


def test_a_revoked_approval_is_refused_after_its_bundle_was_parsed(tmp_path: Path) -> None:
    agent = _agent(tmp_path, require_approval=True)
    bundle = _bundle()
    task = _task(bundle)
    _refused(agent, task, "not-approved", "is not approved at this site")
    agent.approvals.approve([bundle.sha256])
    _start(agent, task)

    assert agent.approvals.revoke(bundle.sha256)

    _refused(agent, task, "not-approved", "is not approved at this site")


def test_a_task_leaving_its_runs_bundle_is_refused_after_the_bundle_was_parsed(
    tmp_path: Path,
) -> None:
    agent = _agent(tmp_path)
    bundle = _bundle({"learning_rate": (1e-4, 1e-2)})
    _start(agent, _task(bundle, HopHyperparameters(learning_rate=0.005)))

    _refused(agent, _task(bundle, HopHyperparameters(learning_rate=0.05)), "not-approved",
             "learning_rate=0.05 is outside")  # fmt: skip
    _refused(agent, _task(bundle, dataset="other"), "not-approved",
             "task dataset differs from its run's bundle")  # fmt: skip
    # Another bundle (other bytes) is its own: its bounds, not the first one's.
    wider = _bundle({"learning_rate": (1e-4, 1e-1)})
    _start(agent, _task(wider, HopHyperparameters(learning_rate=0.05)))


def test_kept_hyperparameter_values_cannot_be_changed_by_a_check(tmp_path: Path) -> None:
    message = to_message(HopHyperparameters(learning_rate=0.02))
    _, values = hop_runner._hyperparameters(message.SerializeToString(deterministic=True))

    with pytest.raises(TypeError):
        values["learning_rate"] = 1.0  # type: ignore[index]


def test_a_preparation_hashes_the_source_so_a_change_its_identity_hides_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "_RECENT_CHANGE_NS", 0)
    # What a filesystem that keeps no timestamps (or a change in the same tick) looks like.
    monkeypatch.setattr(registry, "_source_identity", lambda path: (1, 2, 3, 4, 5))
    agent = _agent(tmp_path)
    task = _task(_bundle())
    _start(agent, task)  # the source hashed; then vouched for by its (unchanging) identity
    source = tmp_path / "heart.csv"
    source.write_text(source.read_text().replace("\n", "\n\n", 1))

    agent._prepare(task)  # "you are next": the full hash finds the change

    assert _trainer(agent).prepared == []
    _refused(agent, task, "dataset-invalid", "changed since dataset 'heart' was registered")


def test_targets_are_kept_per_split_and_labels_and_unknown_labels_still_refused() -> None:
    from site_agent.tasks._sequence_classification import SequenceClassificationTask

    task = SequenceClassificationTask(None)  # type: ignore[arg-type]  # targets need no tokenizer
    lora = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules=("query", "value"))
    spec = TaskSpec(task_type="seq-classification", labels=("a", "b"), lora=lora, options={})
    split = tuple(TextExample(text=f"n{i}", label="ab"[i % 2]) for i in range(6))

    first = task.targets(spec, split)

    assert task.targets(spec, split) is first
    assert first.tolist() == [0, 1, 0, 1, 0, 1]
    swapped = TaskSpec(task_type="seq-classification", labels=("b", "a"), lora=lora, options={})
    assert task.targets(swapped, split).tolist() == [1, 0, 1, 0, 1, 0]
    narrower = TaskSpec(task_type="seq-classification", labels=("a", "c"), lora=lora, options={})
    with pytest.raises(ValueError, match=r"labels \['b'\] are not in the run's label set"):
        task.targets(narrower, split)
    # A split that is not an immutable tuple is computed every time.
    assert task.targets(spec, list(split)) is not task.targets(spec, list(split))


def test_a_runs_task_spec_is_built_once_and_bad_options_are_still_refused() -> None:
    lora = pb.LoraConfig(r=8, alpha=16, target_modules=["query", "value"])
    task_checks._spec_of.cache_clear()

    first = task_checks._task_spec("seq-classification", ["a", "b"], lora, '{"max_length": 32}')
    again = task_checks._task_spec("seq-classification", ["a", "b"], lora, '{"max_length": 32}')

    assert again is first and first.options == {"max_length": 32}
    other = task_checks._task_spec("seq-classification", ["a", "b"], lora, '{"max_length": 64}')
    assert other.options == {"max_length": 64}
    for _ in range(2):
        with pytest.raises(HopFailure, match="task options must be a JSON object"):
            task_checks._task_spec("seq-classification", ["a", "b"], lora, "[1]")
        with pytest.raises(ValueError, match="labels must be unique"):
            task_checks._task_spec("seq-classification", ["a", "a"], lora, "{}")
