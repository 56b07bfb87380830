"""A hop prepared ahead (model built, data encoded) and loaded in place equals a fresh hop."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from site_agent.registry import RegisteredDataset
from site_agent.tasks import HopHyperparameters, LoraSettings, TaskSpec, _loop, create_trainer
from site_agent.tasks._spec import PreparingTrainer

FIRST = HopHyperparameters(learning_rate=1e-2, steps=3, batch_size=8, seed=11)
SECOND = HopHyperparameters(learning_rate=5e-3, steps=3, batch_size=4, seed=12, proximal_mu=0.5)


@pytest.fixture
def spec(labels: tuple[str, ...]) -> TaskSpec:
    return TaskSpec(
        "seq-classification",
        labels=labels,
        lora=LoraSettings(r=4, alpha=8, dropout=0.1),
        options={"max_length": 24},
    )


def test_a_prepared_hop_loads_its_input_in_place_and_trains_exactly_like_a_fresh_one(
    tiny_model_dir: Path, spec: TaskSpec, site_datasets: list[RegisteredDataset]
) -> None:
    fresh = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    prepared = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    assert isinstance(prepared, PreparingTrainer)
    dataset = site_datasets[0]

    first = fresh.run_hop(spec, dataset, FIRST, None)
    second = fresh.run_hop(spec, dataset, SECOND, first.tensors)

    prepared.prepare(spec, dataset, FIRST.seed)
    torch.manual_seed(999)  # whatever ran in between must not change the hop
    first_prepared = prepared.run_hop(spec, dataset, FIRST, None)
    prepared.prepare(spec, dataset, SECOND.seed)
    second_prepared = prepared.run_hop(spec, dataset, SECOND, first.tensors)

    for expected, actual in ((first, first_prepared), (second, second_prepared)):
        assert expected.metrics == actual.metrics
        assert expected.tensors.keys() == actual.tensors.keys()
        for name, tensor in expected.tensors.items():
            assert torch.equal(tensor, actual.tensors[name]), name


def test_in_place_load_gives_the_outputs_of_a_freshly_built_model(
    tiny_model_dir: Path, spec: TaskSpec, site_datasets: list[RegisteredDataset]
) -> None:
    trainer = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    assert isinstance(trainer, PreparingTrainer)
    dataset = site_datasets[1]
    incoming = trainer.run_hop(spec, dataset, FIRST, None).tensors

    trainer.prepare(spec, dataset, SECOND.seed)
    in_place = trainer.run_hop(spec, dataset, SECOND, incoming, defer_validation=True)
    fresh = trainer.run_hop(spec, dataset, SECOND, incoming)

    # Same input, same seed: the in-place hop's deferred validation and tensors match a hop
    # that built its model from a fresh copy of the base.
    assert in_place.validate is not None
    assert {**in_place.validate(), **in_place.metrics} == fresh.metrics
    assert set(in_place.metrics) == {"train_loss", "train_steps", "train_examples"}
    for name, tensor in fresh.tensors.items():
        assert torch.equal(tensor, in_place.tensors[name]), name


def test_a_preparation_for_another_seed_is_not_used(
    tiny_model_dir: Path, spec: TaskSpec, site_datasets: list[RegisteredDataset]
) -> None:
    trainer = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    other = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    assert isinstance(trainer, PreparingTrainer)
    dataset = site_datasets[2]

    trainer.prepare(spec, dataset, seed=FIRST.seed + 1)
    outcome = trainer.run_hop(spec, dataset, FIRST, None)

    expected = other.run_hop(spec, dataset, FIRST, None)
    assert outcome.metrics == expected.metrics


def _prepared_for_the_first_hop(
    tiny_model_dir: Path, spec: TaskSpec, dataset: RegisteredDataset
) -> PreparingTrainer:
    trainer = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    assert isinstance(trainer, PreparingTrainer)
    trainer.prepare(spec, dataset, FIRST.seed)
    return trainer


def test_a_prepared_hop_builds_no_optimizer_once_its_task_has_come(
    tiny_model_dir: Path,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = site_datasets[0]
    trainer = _prepared_for_the_first_hop(tiny_model_dir, spec, dataset)
    built: list[object] = []
    real = _loop.AdamW

    class _Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            built.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(_loop, "AdamW", _Counting)
    trainer.run_hop(spec, dataset, FIRST, None, defer_validation=True)

    # Built (in training mode, with its optimizer) while another site trained.
    assert built == []


def test_an_optimizer_that_stepped_is_refused_as_a_prepared_one() -> None:
    from site_agent.tasks._loop import idle_optimizer, train

    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = idle_optimizer([parameter])
    parameter.grad = torch.ones(2)
    optimizer.step()

    with pytest.raises(ValueError, match="idle"):
        train(trainable=[parameter], batch_loss=lambda index: parameter.sum(), num_examples=4,
              hyperparameters=FIRST, device=torch.device("cpu"), fp16=False, anchors=None,
              progress=None, should_cancel=None, optimizer=optimizer)  # fmt: skip


def test_a_prepared_hops_egress_check_builds_no_second_model(
    tiny_model_dir: Path,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = site_datasets[0]
    trainer = _prepared_for_the_first_hop(tiny_model_dir, spec, dataset)
    other = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    trainer.run_hop(spec, dataset, FIRST, None, defer_validation=True)
    built: list[object] = []
    monkeypatch.setattr(trainer, "adapter_model", lambda *a, **k: built.append(a))

    declared = trainer.trainable_state(spec, dataset)

    # Found while preparing: the hand back's check copies no base model (the first hand back
    # of a site used to pay a whole model build here). The same as a fresh trainer finds.
    assert built == []
    assert declared == other.trainable_state(spec, dataset)


def test_an_unprepared_hops_egress_check_builds_no_second_model_either(
    tiny_model_dir: Path,
    spec: TaskSpec,
    site_datasets: list[RegisteredDataset],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset = site_datasets[0]
    trainer = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    other = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    # A run's first hop: its task came with nothing prepared (no site trained before it).
    outcome = trainer.run_hop(spec, dataset, FIRST, None, defer_validation=True)
    built: list[object] = []
    monkeypatch.setattr(trainer, "adapter_model", lambda *a, **k: built.append(a))

    declared = trainer.trainable_state(spec, dataset)

    # Found from the hop's own model: the first hand back of a run used to build a whole
    # model here (45 ms on the first handoff of a MiniLM run).
    assert built == []
    assert declared == other.trainable_state(spec, dataset)
    assert [(t.name, t.dtype, t.shape) for t in declared] == sorted(
        (name, "F32", tuple(tensor.shape)) for name, tensor in outcome.tensors.items()
    )
