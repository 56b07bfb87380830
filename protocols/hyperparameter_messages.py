"""The wire form of `HopHyperparameters`: field by field, by name, to and from its proto message.

Kept apart from `protocols.hyperparameters` so that code which must not import the gRPC stubs
(`ordering`) can use the model.
"""

from __future__ import annotations

import dataclasses

from pydantic import ValidationError

from protocols.hyperparameters import HopHyperparameters, describe_problems
from protocols.v1 import baton_pb2 as pb

__all__ = ["HyperparameterMessageError", "from_message", "to_message"]


class HyperparameterMessageError(ValueError):
    """A task's hyperparameters message holds a value outside the model's bounds."""


def to_message(hyperparameters: HopHyperparameters) -> pb.HopHyperparameters:
    """The proto message carrying every field of `hyperparameters`."""
    return pb.HopHyperparameters(**hyperparameters.model_dump())


def from_message(message: pb.HopHyperparameters) -> HopHyperparameters:
    """The model a message describes; a field with presence that is not set takes its default.

    Raises:
        HyperparameterMessageError: Naming every field out of bounds, on one line.
    """
    descriptor = message.DESCRIPTOR.fields_by_name
    present = {field.name for field, _ in message.ListFields()}
    values = {
        name: getattr(message, name)
        for name in (field.name for field in dataclasses.fields(HopHyperparameters))
        if name in present or not descriptor[name].has_presence
    }
    try:
        return HopHyperparameters.model_validate(values)
    except ValidationError as exc:
        raise HyperparameterMessageError(describe_problems(exc)) from exc
