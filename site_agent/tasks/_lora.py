"""What LoRA tasks share: the base-model hash, building adapters and moving their tensors."""

from __future__ import annotations

import copy
import json
import threading
import weakref
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Protocol, cast

import torch
from peft import (
    LoraConfig,
    PeftModel,
    TaskType,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import PretrainedConfig, PreTrainedModel

from site_agent.tasks._spec import LoraSettings, TaskSpec
from site_agent.tasks._state import checked_state, outgoing, preview


class _LoadResult(Protocol):
    """What ``set_peft_model_state_dict`` returns (torch's ``_IncompatibleKeys``)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def max_length_option(spec: TaskSpec, default: int, config: PretrainedConfig) -> int:
    """The ``max_length`` task option, checked against the model's position embeddings."""
    value = spec.options.get("max_length", default)
    max_positions = getattr(config, "max_position_embeddings", None)
    upper = max_positions if isinstance(max_positions, int) else None
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise ValueError(f"max_length must be an integer >= 2, got {value!r}")
    if upper is not None and value > upper:
        raise ValueError(f"max_length must be <= {upper} for this model, got {value}")
    return value


# The version counters of each cached base model's parameters, read at its first private copy.
_base_versions: weakref.WeakKeyDictionary[torch.nn.Module, tuple[int, ...]] = (
    weakref.WeakKeyDictionary()
)
_base_versions_lock = threading.Lock()


def private_copy(base: PreTrainedModel) -> PreTrainedModel:
    """A copy of a cached base model for one adapter model (peft edits its module tree in place):
    its own modules, buffers and parameter objects over the base's parameter storage.

    The base's weights are frozen and nothing writes into them: LoRA adds its own tensors, a
    task re-draws its head as new tensors (``prepare_base``), ``.to(device)`` replaces a copy's
    tensors and leaves the base's. Sharing them saves cloning ~90 MB (MiniLM; about 0.3 s of
    CPU, most of a copy's cost, and that memory) per hop, preparation and evaluation. Checked,
    not assumed: any in-place write into a shared tensor moves its version counter (shared with
    the base's), and a copy of a base changed since its first copy is refused.

    Raises:
        ValueError: If the base's weights were written in place since its first copy.
    """
    parameters = list(base.parameters())  # tied weights once: the copy keeps them tied
    versions = tuple(parameter._version for parameter in parameters)
    with _base_versions_lock:
        first = _base_versions.setdefault(base, versions)
    if first != versions:
        changed = sum(a != b for a, b in zip(first, versions, strict=True))
        raise ValueError(
            f"the base model held in memory was written in place ({changed} weight tensors "
            "changed since its first use): restart the site to load it again"
        )
    shared = {
        id(parameter): torch.nn.Parameter(parameter.detach(), requires_grad=parameter.requires_grad)
        for parameter in parameters
    }
    return copy.deepcopy(base, shared)


def build_adapter_model(
    base: PreTrainedModel,
    lora: LoraSettings,
    task_type: TaskType,
    seed: int,
    incoming: Mapping[str, torch.Tensor] | None,
    device: torch.device,
) -> PeftModel:
    """Wraps ``base`` (a private copy: peft edits it in place) with a seeded LoRA adapter.

    ``incoming`` is loaded if given; the caller forks the RNG around this call.
    """
    config = LoraConfig(
        task_type=task_type,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
    )
    torch.manual_seed(seed)  # LoRA A matrices are drawn from the global generator
    try:
        model = get_peft_model(base, config)
    except ValueError as error:
        # peft's message names the target modules it could not find in the base model.
        raise ValueError(f"LoRA settings do not fit the base model: {error}") from error
    if incoming is not None:
        load_adapter(model, incoming)
    return model.to(device)


def load_adapter(model: PeftModel, incoming: Mapping[str, torch.Tensor]) -> None:
    """Loads adapter tensors, refusing anything that does not fit exactly."""
    expected = get_peft_model_state_dict(model)
    state = checked_state(incoming, {key: tuple(t.shape) for key, t in expected.items()})
    result = cast("_LoadResult", set_peft_model_state_dict(model, state))
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    not_loaded = sorted(set(result.missing_keys) & trainable)
    if result.unexpected_keys or not_loaded:
        raise ValueError(
            f"peft did not load the incoming adapter cleanly: unexpected keys "
            f"{preview(sorted(result.unexpected_keys))}, adapter parameters not loaded "
            f"{preview(not_loaded)}"
        )
    # Read the adapter back: proof that every tensor landed where it belongs.
    loaded = get_peft_model_state_dict(model)
    differing = sorted(key for key in state if not torch.equal(loaded[key].cpu(), state[key]))
    if differing:
        raise ValueError(f"incoming adapter tensors did not load: {preview(differing)}")


def adapter_slots(model: PeftModel) -> dict[str, torch.nn.Parameter] | None:
    """Each adapter tensor's name mapped to the trainable parameter that holds it, found once
    per model (peft's state dict shares the parameters' storage), so that an incoming adapter
    can be copied in place with no state-dict round trip; None if the names do not map one to
    one onto the trainable parameters (then ``load_adapter`` is the way)."""
    trainable = {
        (parameter.data_ptr(), tuple(parameter.shape)): parameter
        for parameter in model.parameters()
        if parameter.requires_grad
    }
    slots: dict[str, torch.nn.Parameter] = {}
    for key, tensor in get_peft_model_state_dict(model).items():
        parameter = trainable.get((tensor.data_ptr(), tuple(tensor.shape)))
        if parameter is None or tensor.dtype != parameter.dtype:
            return None
        slots[key] = parameter
    if len({id(p) for p in slots.values()}) != len(slots) or len(slots) != len(trainable):
        return None
    return slots


def load_adapter_in_place(
    slots: Mapping[str, torch.nn.Parameter], incoming: Mapping[str, torch.Tensor]
) -> None:
    """Copies adapter tensors into the parameters ``adapter_slots`` found, after the checks
    ``load_adapter`` makes (names, shapes, finiteness): the same values, no state-dict copies."""
    state = checked_state(incoming, {key: tuple(p.shape) for key, p in slots.items()})
    with torch.no_grad():
        for key, parameter in slots.items():
            parameter.copy_(state[key])


def adapter_tensors(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors as CPU float32 copies (never aliases of live parameters)."""
    return outgoing(get_peft_model_state_dict(model))


def adapter_config(model: PeftModel) -> dict[str, object]:
    """The PEFT ``adapter_config.json`` content, JSON-checked and free of local paths."""
    raw = model.peft_config["default"].to_dict()
    config = {str(key): _jsonable(value) for key, value in raw.items()}
    # Sites may keep the base model at different paths; the base is pinned by its hash instead.
    config["base_model_name_or_path"] = ""
    json.dumps(config)  # fail here, not at upload time, if something is still not JSON
    return config


def _jsonable(value: object) -> object:
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(item) for item in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"adapter config value of type {type(value).__name__} is not JSON-serialisable")
