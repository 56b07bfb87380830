"""A prepared model's adapter slots: incoming tensors copied in place, checked as peft's load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import get_peft_model_state_dict

from site_agent.tasks import LoraSettings, TaskSpec, create_trainer
from site_agent.tasks._lora import adapter_slots, load_adapter, load_adapter_in_place


def _model(tiny_model_dir: Path, labels: tuple[str, ...], seed: int) -> torch.nn.Module:
    trainer = create_trainer("seq-classification", base_model_dir=tiny_model_dir, device="cpu")
    spec = TaskSpec("seq-classification", labels=labels, lora=LoraSettings(r=4, alpha=8))
    return trainer.adapter_model(spec, None, seed=seed)  # type: ignore[attr-defined, no-any-return]


def test_slots_cover_every_adapter_tensor_and_load_exactly_what_peft_loads(
    tiny_model_dir: Path, labels: tuple[str, ...]
) -> None:
    source = _model(tiny_model_dir, labels, seed=1)
    incoming = {k: v.clone() + 0.25 for k, v in get_peft_model_state_dict(source).items()}
    by_peft, in_place = _model(tiny_model_dir, labels, 2), _model(tiny_model_dir, labels, 2)

    slots = adapter_slots(in_place)  # type: ignore[arg-type]
    assert slots is not None
    assert set(slots) == set(incoming)  # LoRA matrices and the classification head
    assert any("classifier" in key for key in slots)
    load_adapter(by_peft, incoming)  # type: ignore[arg-type]
    load_adapter_in_place(slots, incoming)

    expected = get_peft_model_state_dict(by_peft)
    actual = get_peft_model_state_dict(in_place)
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        assert torch.equal(tensor, actual[key]), key
        assert torch.equal(tensor, incoming[key]), key


def test_in_place_load_refuses_what_does_not_fit(
    tiny_model_dir: Path, labels: tuple[str, ...]
) -> None:
    model = _model(tiny_model_dir, labels, seed=1)
    slots = adapter_slots(model)  # type: ignore[arg-type]
    assert slots is not None
    good = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    key = next(iter(sorted(good)))

    with pytest.raises(ValueError, match="missing keys"):
        load_adapter_in_place(slots, {k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="has shape"):
        load_adapter_in_place(slots, {**good, key: torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="non-finite"):
        load_adapter_in_place(slots, {**good, key: torch.full_like(good[key], float("nan"))})
