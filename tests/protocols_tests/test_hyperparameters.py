"""A hop's hyperparameters: one model, its bounds, and its proto message."""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest
from google.protobuf.descriptor import FieldDescriptor
from pydantic import ValidationError

from protocols.approval import HYPERPARAMETERS, ApprovalBundle, BundleViolation
from protocols.hyperparameter_messages import (
    HyperparameterMessageError,
    from_message,
    to_message,
)
from protocols.hyperparameters import BOUNDED_HYPERPARAMETERS, HopHyperparameters
from protocols.v1 import baton_pb2 as pb
from tests.hyperparameter_bounds import FIELDS, NUMERIC, edges, out_of_bounds

_INTEGER_TYPES = {
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
}


def _extreme(end: int) -> HopHyperparameters:
    """Every numeric field at its lower (0) or upper (1) edge, the last schedule."""
    values: dict[str, object] = {name: edges(name)[end] for name in NUMERIC}
    return HopHyperparameters(**values, lr_schedule="constant")  # type: ignore[arg-type]


def test_every_model_field_travels_in_the_message_field_of_the_same_name_and_kind() -> None:
    message_fields = pb.HopHyperparameters.DESCRIPTOR.fields_by_name
    model_fields = [field.name for field in dataclasses.fields(HopHyperparameters)]
    assert sorted(model_fields) == sorted(message_fields)
    for name in model_fields:
        annotation, wire = FIELDS[name].annotation, message_fields[name].type
        if annotation is int:
            assert wire in _INTEGER_TYPES, name
        elif annotation is float:
            assert wire == FieldDescriptor.TYPE_DOUBLE, name
        else:
            assert wire == FieldDescriptor.TYPE_STRING and get_args(annotation), name


@pytest.mark.parametrize(
    "hyperparameters",
    [HopHyperparameters(), _extreme(0), _extreme(1), HopHyperparameters(epochs=0.5, seed=7)],
    ids=["defaults", "lower-edges", "upper-edges", "fractional-epochs"],
)
def test_the_model_survives_the_wire_unchanged(hyperparameters: HopHyperparameters) -> None:
    message = pb.HopHyperparameters.FromString(to_message(hyperparameters).SerializeToString())
    assert from_message(message) == hyperparameters


def test_a_message_without_a_schedule_trains_with_the_models_default_schedule() -> None:
    message = pb.HopHyperparameters(learning_rate=0.01, steps=3, batch_size=4, max_grad_norm=1.0)
    assert from_message(message) == HopHyperparameters(learning_rate=0.01, steps=3, batch_size=4)
    assert from_message(message).lr_schedule == "linear"


@pytest.mark.parametrize(("name", "value"), out_of_bounds())
def test_a_value_outside_the_bounds_is_refused_by_the_model_and_the_wire(
    name: str, value: float
) -> None:
    with pytest.raises(ValidationError, match=name):
        HopHyperparameters(**{name: value})  # type: ignore[arg-type]
    values = HopHyperparameters().model_dump() | {name: value}
    try:
        message = pb.HopHyperparameters(**values)
    except ValueError:
        return  # the wire type cannot even carry it (a negative unsigned integer)
    with pytest.raises(HyperparameterMessageError, match=f"^{name}: "):
        from_message(message)


def test_an_unknown_schedule_on_the_wire_is_refused_in_one_line() -> None:
    message = to_message(HopHyperparameters())
    message.lr_schedule = "cosine"
    with pytest.raises(HyperparameterMessageError) as refused:
        from_message(message)
    assert str(refused.value) == "lr_schedule: Input should be 'linear' or 'constant'"


def test_approvals_bound_the_numeric_hyperparameters_that_shape_what_a_hop_learns() -> None:
    assert set(BOUNDED_HYPERPARAMETERS) <= set(NUMERIC)
    assert {"learning_rate", "steps", "epochs", "batch_size", "proximal_mu"} <= set(
        BOUNDED_HYPERPARAMETERS
    )
    assert "seed" not in BOUNDED_HYPERPARAMETERS  # it changes no data exposure
    assert HYPERPARAMETERS == BOUNDED_HYPERPARAMETERS


def test_a_bundle_bounding_a_non_numeric_hyperparameter_refuses_instead_of_crashing() -> None:
    bundle = ApprovalBundle("tabular", "heart", "", bounds={"lr_schedule": (0.0, 1.0)})
    with pytest.raises(BundleViolation, match="lr_schedule='linear' is not a number"):
        bundle.check_hyperparameters(HopHyperparameters().model_dump())
