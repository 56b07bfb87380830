"""A hop's hyperparameters, defined once: every field's type, default and bounds.

The run plan, the coordinator's task builder, the site agent, the trainers, the approval bundle's
bounds and the ordering search all use `HopHyperparameters`. Its wire form is the proto message
of the same name (converted in `protocols.hyperparameter_messages`, which this module does not
import, so that `ordering` can use the model without the gRPC stubs).

Adding a hyperparameter: a field here (type, default, bounds; numeric fields are bounded by
approval bundles unless marked `_NOT_BOUNDED`), an `optional` field of the same name in the proto
message (unset on the wire: the default here), and the trainer code that reads it. The plan, the
admin JSON, the engine, the agent, the approval bounds and the search pick it up from this model.
LoRA settings are per run, not per hop: they stay in the plan's `lora` and the task spec.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, Literal, get_args

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.config import JsonDict
from pydantic.dataclasses import dataclass
from pydantic.fields import FieldInfo

__all__ = [
    "BOUNDED_HYPERPARAMETERS",
    "LR_SCHEDULES",
    "HopHyperparameters",
    "LrSchedule",
    "describe_problems",
]

LrSchedule = Literal["linear", "constant"]
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)

# Marks a numeric field that an approval bundle does not bound (it changes no data exposure).
_NOT_BOUNDED: JsonDict = {"bounded": False}


@dataclass(frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))
class HopHyperparameters:
    """What one site trains with during one visit.

    The learning rate warms up linearly over ``warmup_steps`` optimizer steps, then (schedule
    ``linear``) decays linearly so that it would reach 0 after the last step, or (``constant``)
    stays put. With ``proximal_mu > 0`` and incoming weights, the loss gains
    ``mu / 2 * sum ||w - w_incoming||^2`` over the trainable tensors (FedProx), which limits how
    far one site pulls the model.

    ``epochs`` is a float everywhere: a visit may be a fraction of a pass over a large site's
    train split (0.5), the wire carries a double, and 0 means "use ``steps``" (no separate unset
    state). A search that only tries whole epochs still produces floats (2.0).

    Every field has finite upper and lower bounds: a value outside them is refused by the plan,
    the site agent and the trainers alike (a ``pydantic.ValidationError``, a ``ValueError``).
    A pydantic dataclass: ``dataclasses.replace`` re-validates, and run plans (pydantic models)
    embed it; ``model_dump`` / ``model_validate`` read as they do on those models.
    """

    learning_rate: float = Field(default=5e-4, gt=0, le=1)
    steps: int = Field(default=20, ge=1, le=1_000_000)  # optimizer steps, unless `epochs` > 0
    epochs: float = Field(default=0.0, ge=0, le=10_000)  # > 0: passes over the train split
    batch_size: int = Field(default=16, ge=1, le=4096)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    warmup_steps: int = Field(default=0, ge=0, le=1_000_000)
    max_grad_norm: float = Field(default=1.0, ge=0, le=1e6)  # 0 disables gradient clipping
    seed: int = Field(default=0, ge=0, lt=2**63, json_schema_extra=_NOT_BOUNDED)
    proximal_mu: float = Field(default=0.0, ge=0, le=1e4)
    lr_schedule: LrSchedule = "linear"
    # AdamW's second-moment decay; 0.95-0.98 steadies training on small, noisy batches.
    adam_beta2: float = Field(default=0.999, gt=0, lt=1, json_schema_extra=_NOT_BOUNDED)

    def total_steps(self, train_examples: int) -> int:
        """Optimizer steps of the hop: ``steps``, or ``epochs`` passes over the train split."""
        if self.epochs <= 0:
            return self.steps
        batches_per_epoch = math.ceil(train_examples / self.batch_size)
        return max(1, math.ceil(self.epochs * batches_per_epoch))

    def model_dump(self) -> dict[str, Any]:
        """The JSON-able values by field name (what plans and the ledger store)."""
        return dataclasses.asdict(self)

    @classmethod
    def model_validate(cls, values: Mapping[str, Any]) -> HopHyperparameters:
        """Parses a mapping of field names (missing ones take their defaults).

        Raises:
            pydantic.ValidationError: Naming every field that is unknown or out of bounds.
        """
        return _adapter().validate_python(dict(values))


@functools.cache
def _adapter() -> TypeAdapter[HopHyperparameters]:
    return TypeAdapter(HopHyperparameters)


def describe_problems(exc: ValidationError) -> str:
    """One line naming every refused field, e.g. ``steps: Input should be greater than or equal
    to 1; lr_schedule: Input should be 'linear' or 'constant'``."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'hyperparameters'}: {error['msg']}"
        for error in exc.errors()
    )


def _bounded_names() -> tuple[str, ...]:
    fields: dict[str, FieldInfo] = HopHyperparameters.__pydantic_fields__  # type: ignore[attr-defined]
    return tuple(
        name
        for name, spec in fields.items()
        if spec.annotation in (int, float) and spec.json_schema_extra != _NOT_BOUNDED
    )


# The numeric hyperparameters an approval bundle bounds and a site's policy may cap.
BOUNDED_HYPERPARAMETERS: tuple[str, ...] = _bounded_names()
