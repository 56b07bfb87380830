"""Ordering test fixtures: quiet Optuna, sites, a synthetic objective, the tabular trainer the
benchmarks' tests train with."""

from __future__ import annotations

from collections.abc import Iterator

import optuna
import pytest

from ordering import SyntheticObjective
from site_agent.tasks import TabularTrainer
from tests.benchmark_module import tabular_trainer


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


@pytest.fixture(scope="module")
def trainer() -> TabularTrainer:
    """The CPU tabular trainer the heart disease benchmarks train with."""
    return tabular_trainer()
