"""Permutation encodings: every order survives encode -> enqueue/FixedTrial -> suggest."""

from __future__ import annotations

import itertools

import optuna
import pytest

from ordering import (
    ENCODINGS,
    AllOrders,
    LehmerCode,
    PermutationEncoding,
    RandomKeys,
    encoding_by_name,
)

ALL = [LehmerCode(), RandomKeys(), AllOrders()]


@pytest.mark.parametrize("encoding", ALL, ids=lambda e: e.name)
def test_every_order_of_five_sites_round_trips_through_a_fixed_trial(
    encoding: PermutationEncoding, five_sites: tuple[str, ...]
) -> None:
    for order in itertools.permutations(five_sites):
        params = encoding.encode(order, five_sites, prefix="c0_")
        assert encoding.suggest(optuna.trial.FixedTrial(params), five_sites, "c0_") == order


@pytest.mark.parametrize("encoding", ALL, ids=lambda e: e.name)
def test_every_order_of_five_sites_round_trips_through_enqueue_trial(
    encoding: PermutationEncoding, five_sites: tuple[str, ...]
) -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    orders = list(itertools.permutations(five_sites))
    for order in orders:
        study.enqueue_trial(encoding.encode(order, five_sites))
    for order in orders:
        trial = study.ask()
        assert encoding.suggest(trial, five_sites, "") == order
        study.tell(trial, 0.0)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_the_lehmer_digit_grid_covers_every_order_exactly_once() -> None:
    sites = ("a", "b", "c", "d")
    seen: list[tuple[str, ...]] = []

    def objective(trial: optuna.Trial) -> float:
        seen.append(LehmerCode().suggest(trial, sites, ""))
        return 0.0

    study = optuna.create_study(sampler=optuna.samplers.BruteForceSampler(seed=0))
    study.optimize(objective, n_trials=100)  # brute force stops after the 24 digit vectors
    assert sorted(seen) == sorted(itertools.permutations(sites))


@pytest.mark.parametrize("encoding", ALL, ids=lambda e: e.name)
def test_an_order_that_is_not_a_permutation_is_refused(encoding: PermutationEncoding) -> None:
    with pytest.raises(ValueError, match="not a permutation"):
        encoding.encode(("a", "b", "b"), ("a", "b", "c"))
    with pytest.raises(ValueError, match="not a permutation"):
        encoding.encode(("a", "b"), ("a", "b", "c"))


def test_all_orders_refuses_more_sites_than_it_can_enumerate() -> None:
    sites = tuple(f"s{i}" for i in range(7))
    with pytest.raises(ValueError, match="limited to 6 sites"):
        AllOrders().encode(sites, sites)


def test_encodings_are_found_by_their_stored_name() -> None:
    assert [encoding_by_name(name).name for name in ENCODINGS] == list(ENCODINGS)
    with pytest.raises(ValueError, match="unknown permutation encoding"):
        encoding_by_name("zigzag")


def test_default_encoding_follows_the_measurement() -> None:
    from ordering import LehmerCode, RandomKeys, default_encoding

    assert isinstance(default_encoding(4), LehmerCode)
    assert isinstance(default_encoding(6), RandomKeys)
