"""Ordering test fixtures: quiet Optuna, sites, a synthetic objective."""

from __future__ import annotations

from collections.abc import Iterator

import optuna
import pytest

from ordering import SyntheticObjective


@pytest.fixture(autouse=True, scope="session")
def _quiet_optuna() -> Iterator[None]:
    """Optuna logs every study creation at INFO; tests only want warnings."""
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(previous)


@pytest.fixture
def five_sites() -> tuple[str, ...]:
    return ("north", "south", "east", "west", "centre")


@pytest.fixture
def synthetic() -> SyntheticObjective:
    return SyntheticObjective(5, seed=0)
