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


def test_incoming_values_are_checked_finite_in_one_pass_per_dtype_and_a_bad_one_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from site_agent.tasks import _state

    shapes = {f"t{i:02d}": (3, 2) for i in range(30)}
    incoming = {key: torch.randn(shape) for key, shape in shapes.items()}
    incoming["t07"] = incoming["t07"].double() * 1e300  # finite in float64
    incoming["t08"] = incoming["t08"].half()
    incoming["t09"] = incoming["t09"].bfloat16()  # numpy has no bfloat16: torch checks it
    checked: list[int] = []
    is_finite = _state.is_finite
    monkeypatch.setattr(
        _state, "is_finite", lambda tensor: checked.append(tensor.numel()) or is_finite(tensor)
    )
    passes: list[int] = []
    isfinite = _state.np.isfinite
    monkeypatch.setattr(
        _state.np, "isfinite", lambda values: passes.append(values.size) or isfinite(values)
    )

    state = _state.checked_state(incoming, shapes)

    # float64, float16 and the 27 float32 together by numpy; bfloat16 alone by torch.
    assert sorted(passes) == [6, 6, 27 * 6] and checked == [6]
    assert all(t.dtype == torch.float32 for t in state.values())
    for bad in (float("nan"), float("inf")):
        broken = {**incoming, "t03": incoming["t03"].clone(), "t20": incoming["t20"].clone()}
        broken["t03"][1, 0] = bad
        broken["t20"][0, 1] = -bad
        with pytest.raises(ValueError, match=r"non-finite values in \['t03', 't20'\]"):
            _state.checked_state(broken, shapes)
    broken = {**incoming, "t09": incoming["t09"].clone()}
    broken["t09"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values in \['t09'\]"):
        _state.checked_state(broken, shapes)


def test_cpu_values_are_checked_on_the_calling_thread_not_torchs_thread_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from site_agent.tasks import _state

    # An adapter's worth of values: torch would run its concatenation and isfinite on its
    # intra-op pool, each waiting for a pool thread on a loaded host.
    tensors = [torch.randn(384, 8) for _ in range(30)]

    def no_torch(*args: object, **kwargs: object) -> None:
        raise AssertionError("a torch operation checked CPU values")

    monkeypatch.setattr(_state.torch, "cat", no_torch)
    monkeypatch.setattr(_state.torch, "isfinite", no_torch)

    assert _state.all_finite(tensors)
    tensors[17][3, 5] = float("-inf")
    assert not _state.all_finite(tensors)
    assert not _state.all_finite([tensors[17]])
