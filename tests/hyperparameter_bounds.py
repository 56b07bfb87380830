"""Values just inside and just outside every bounded hyperparameter, read from the one model.

Tests of every consumer (plan, wire decoder, agent, trainers, search space) draw from here, so
a bound changed in `protocols.hyperparameters` is checked everywhere without editing a test.
"""

from __future__ import annotations

import dataclasses

import annotated_types
from pydantic.fields import FieldInfo

from protocols.hyperparameters import HopHyperparameters

FIELDS: dict[str, FieldInfo] = HopHyperparameters.__pydantic_fields__  # type: ignore[attr-defined]
NUMERIC = tuple(
    field.name
    for field in dataclasses.fields(HopHyperparameters)
    if FIELDS[field.name].annotation in (int, float)
)


def _nudge(name: str, value: float, direction: int) -> int | float:
    if FIELDS[name].annotation is int:
        return int(value) + direction
    return value + direction * max(abs(value) * 1e-6, 1e-9)


def _limits(name: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """((smallest accepted, largest accepted), (just below, just above))."""
    accepted: list[float | None] = [None, None]
    refused: list[float | None] = [None, None]
    for rule in FIELDS[name].metadata:
        if isinstance(rule, annotated_types.Ge):
            accepted[0], refused[0] = rule.ge, _nudge(name, float(rule.ge), -1)
        elif isinstance(rule, annotated_types.Gt):
            accepted[0], refused[0] = _nudge(name, float(rule.gt), +1), rule.gt
        elif isinstance(rule, annotated_types.Le):
            accepted[1], refused[1] = rule.le, _nudge(name, float(rule.le), +1)
        elif isinstance(rule, annotated_types.Lt):
            accepted[1], refused[1] = _nudge(name, float(rule.lt), -1), rule.lt
    assert None not in accepted, f"{name} needs a lower and an upper bound"
    cast = FIELDS[name].annotation
    low, high = (cast(value) for value in accepted)
    below, above = (cast(value) for value in refused)
    return (low, high), (below, above)


def edges(name: str) -> tuple[int | float, int | float]:
    """The smallest and largest value `name` accepts."""
    return _limits(name)[0]


def beyond(name: str) -> tuple[int | float, int | float]:
    """A value just below the smallest and one just above the largest `name` accepts."""
    return _limits(name)[1]


def out_of_bounds() -> list[tuple[str, int | float]]:
    """(name, value) for every numeric hyperparameter's two out-of-bounds neighbours."""
    return [(name, value) for name in NUMERIC for value in beyond(name)]
