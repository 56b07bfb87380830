"""Permutation encodings: ways to express a site order as Optuna parameters, and back."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from optuna.trial import BaseTrial

__all__ = [
    "ENCODINGS",
    "AllOrders",
    "LehmerCode",
    "PermutationEncoding",
    "RandomKeys",
    "encoding_by_name",
]

ParamValue = int | float | str


@runtime_checkable
class PermutationEncoding(Protocol):
    """Turns Optuna suggestions into a site order, and an order into the parameters giving it.

    Optuna has no permutation distribution, so each encoding maps a few ordinary parameters onto
    the n! orders. `encode` is the inverse of `suggest`: enqueueing its parameters (with
    `Study.enqueue_trial`) makes `suggest` return the same order.
    """

    @property
    def name(self) -> str:
        """A stable identifier, stored with each trial."""
        ...

    def suggest(self, trial: BaseTrial, sites: Sequence[str], prefix: str) -> tuple[str, ...]:
        """Suggests an order of `sites`, naming every parameter with `prefix`."""
        ...

    def encode(
        self, order: Sequence[str], sites: Sequence[str], *, prefix: str = ""
    ) -> dict[str, ParamValue]:
        """The parameters that make `suggest(trial, sites, prefix)` return `order`."""
        ...


def _check_permutation(order: Sequence[str], sites: Sequence[str]) -> None:
    if len(order) != len(sites) or set(order) != set(sites) or len(set(order)) != len(order):
        raise ValueError(f"order {list(order)} is not a permutation of the sites {list(sites)}")


class LehmerCode:
    """Position i holds the index of its site among the sites not yet placed.

    Digit i ranges over 0..n-1-i, so every digit vector is a valid order and uniform digits give a
    uniform order. The last digit is always 0 and is not suggested.
    """

    name = "lehmer"

    def suggest(self, trial: BaseTrial, sites: Sequence[str], prefix: str) -> tuple[str, ...]:
        remaining = list(sites)
        order: list[str] = []
        for i in range(len(sites) - 1):
            digit = trial.suggest_int(f"{prefix}lehmer_{i}", 0, len(sites) - 1 - i)
            order.append(remaining.pop(digit))
        order.extend(remaining)
        return tuple(order)

    def encode(
        self, order: Sequence[str], sites: Sequence[str], *, prefix: str = ""
    ) -> dict[str, ParamValue]:
        _check_permutation(order, sites)
        remaining = list(sites)
        params: dict[str, ParamValue] = {}
        for i, site in enumerate(order[:-1]):
            digit = remaining.index(site)
            params[f"{prefix}lehmer_{i}"] = digit
            remaining.pop(digit)
        return params


class RandomKeys:
    """One float key in [0, 1] per site; the order sorts sites by key (ties by listing order)."""

    name = "random-keys"

    def suggest(self, trial: BaseTrial, sites: Sequence[str], prefix: str) -> tuple[str, ...]:
        keys = [trial.suggest_float(f"{prefix}key_{site}", 0.0, 1.0) for site in sites]
        positions = np.argsort(np.asarray(keys, dtype=float), kind="stable")
        return tuple(sites[int(p)] for p in positions)

    def encode(
        self, order: Sequence[str], sites: Sequence[str], *, prefix: str = ""
    ) -> dict[str, ParamValue]:
        _check_permutation(order, sites)
        n = len(order)
        # Mid-bucket keys: far from ties, so the sampler's neighbourhood keeps the order.
        return {f"{prefix}key_{site}": (position + 0.5) / n for position, site in enumerate(order)}


class AllOrders:
    """One categorical parameter over all n! orders; only for a handful of sites.

    Each order is a choice such as ``"a,b,c"``: readable in optuna-dashboard, but the sampler sees
    no structure between orders, so it is a reference point rather than a strong encoding.
    """

    name = "all-orders"

    def __init__(self, max_sites: int = 6) -> None:
        self.max_sites = max_sites

    def _choices(self, sites: Sequence[str]) -> list[str]:
        if len(sites) > self.max_sites:
            raise ValueError(
                f"the all-orders encoding enumerates n! orders and is limited to "
                f"{self.max_sites} sites; got {len(sites)}"
            )
        return [",".join(order) for order in itertools.permutations(sites)]

    def suggest(self, trial: BaseTrial, sites: Sequence[str], prefix: str) -> tuple[str, ...]:
        choice = trial.suggest_categorical(f"{prefix}order", self._choices(sites))
        return tuple(str(choice).split(","))

    def encode(
        self, order: Sequence[str], sites: Sequence[str], *, prefix: str = ""
    ) -> dict[str, ParamValue]:
        _check_permutation(order, sites)
        self._choices(sites)
        return {f"{prefix}order": ",".join(order)}


ENCODINGS: tuple[str, ...] = (LehmerCode.name, RandomKeys.name, AllOrders.name)


def default_encoding(n_sites: int) -> PermutationEncoding:
    """The encoding that searched fastest for this many sites (benchmarks/ordering_search.py):
    the Lehmer code up to 4 sites, random keys beyond."""
    return LehmerCode() if n_sites <= 4 else RandomKeys()


def encoding_by_name(name: str) -> PermutationEncoding:
    """The encoding stored under `name` (as recorded with a study).

    Raises:
        ValueError: If no encoding has that name.
    """
    if name == LehmerCode.name:
        return LehmerCode()
    if name == RandomKeys.name:
        return RandomKeys()
    if name == AllOrders.name:
        return AllOrders()
    raise ValueError(f"unknown permutation encoding {name!r}; known: {', '.join(ENCODINGS)}")
