"""Round decisions: who trains from what within a round, and what the round aggregates."""

from __future__ import annotations

from coordinator.ledger.models import HopRow, RoundRow
from coordinator.plan import RunPlan, parse_plan
from coordinator.rounds import (
    DEADLINE_CODE,
    contributions,
    current_round,
    leasable_hops,
    previous_output,
    round_rows,
    stragglers,
)

BASE = {"dataset": "heart", "task": "tabular", "labels": ["0", "1"]}
IN = "1" * 64


def _federated(sites: int, **federated: object) -> RunPlan:
    return parse_plan({**BASE, "mode": "federated", "sites": [f"s{i}" for i in range(sites)],
                       "federated": {"rounds": 3, **federated}})  # fmt: skip


def _hybrid() -> RunPlan:
    return parse_plan({**BASE, "mode": "hybrid", "federated": {"rounds": 2, "local_steps": 4},
                       "groups": [{"name": "north", "sites": ["a", "b"]},
                                  {"name": "south", "sites": ["c"]}]})  # fmt: skip


def _started(row: RoundRow, input_sha: str | None = IN) -> RoundRow:
    row.status, row.input_sha256 = "training", input_sha
    return row


def _commit(hop: HopRow, sha: str, examples: float) -> None:
    hop.status, hop.output_sha256 = "committed", sha
    hop.metrics = {"train_examples": examples, "train_loss": 0.5}


def test_a_federated_run_has_one_hop_per_site_and_round_with_the_round_settings() -> None:
    hops, rounds = round_rows(_federated(3, local_steps=7), "run")
    assert [r.number for r in rounds] == [1, 2, 3] and len(hops) == 9
    assert [h.index for h in hops] == list(range(9))
    by_id = {h.id: h for h in hops}
    for row in rounds:
        assert [name for name, _ in row.members] == ["s0", "s1", "s2"]
        assert [by_id[ids[0]].site for _, ids in row.members] == ["s0", "s1", "s2"]
    assert {h.hyperparameters["steps"] for h in hops} == {7}


def test_sampling_follows_flowers_size_and_is_fixed_by_the_seed() -> None:
    _, rounds = round_rows(_federated(10, fraction_train=0.3, seed=4), "run")
    chosen = [[name for name, _ in r.members] for r in rounds]
    assert all(len(names) == 3 for names in chosen)
    assert chosen == [[n for n, _ in r.members] for r in round_rows(_federated(
        10, fraction_train=0.3, seed=4), "other")[1]]  # fmt: skip
    assert chosen != [[n for n, _ in r.members] for r in round_rows(_federated(
        10, fraction_train=0.3, seed=5), "run")[1]]  # fmt: skip
    assert len({tuple(names) for names in chosen}) > 1  # rounds draw anew


def test_a_hybrid_group_chains_from_the_round_input_and_skips_pass_it_on() -> None:
    hops, rounds = round_rows(_hybrid(), "run")
    by_id = {h.id: h for h in hops}
    first = _started(rounds[0])
    assert [(h.site, sha) for h, sha in leasable_hops(first, by_id)] == [("a", IN), ("c", IN)]
    (north_a, north_b), (south_c,) = ([by_id[i] for i in ids] for _, ids in first.members)
    _commit(north_a, "a" * 64, 30)
    assert [(h.site, sha) for h, sha in leasable_hops(first, by_id)] == [("b", "a" * 64),
                                                                        ("c", IN)]  # fmt: skip
    assert contributions(first, by_id) is None  # still training
    north_b.status = "skipped"
    _commit(south_c, "c" * 64, 10)
    assert leasable_hops(first, by_id) == []
    found = contributions(first, by_id)
    assert found is not None
    expected = [("north", "a" * 64, 30.0), ("south", "c" * 64, 10.0)]
    assert [(c.name, c.sha256, c.examples) for c in found] == expected


def test_a_chains_examples_add_up_and_a_dropped_or_all_skipped_member_gives_nothing() -> None:
    hops, rounds = round_rows(_hybrid(), "run")
    by_id = {h.id: h for h in hops}
    row = _started(rounds[0])
    (north_a, north_b), (south_c,) = ([by_id[i] for i in ids] for _, ids in row.members)
    _commit(north_a, "a" * 64, 30)
    _commit(north_b, "b" * 64, 20)
    assert [m.name for m in stragglers(row, by_id)] == ["south"]
    south_c.status, south_c.error_code = "skipped", DEADLINE_CODE
    found = contributions(row, by_id)
    assert found is not None and [(c.name, c.sha256, c.examples) for c in found] == [
        ("north", "b" * 64, 50.0)
    ]
    north_a.status = north_b.status = "skipped"
    assert contributions(row, by_id) == []


def test_rounds_run_in_order_each_from_the_aggregate_before_it() -> None:
    _, rounds = round_rows(_federated(2), "run")
    assert current_round(rounds) is rounds[0] and previous_output(rounds, rounds[0]) is None
    rounds[0].status, rounds[0].output_sha256 = "aggregated", "f" * 64
    assert current_round(rounds) is rounds[1]
    assert previous_output(rounds, rounds[1]) == "f" * 64
    assert leasable_hops(rounds[1], {}) == []  # pending: its input is not fixed yet
    for row in rounds:
        row.status = "aggregated"
    assert current_round(rounds) is None


def test_the_admin_view_names_members_hops_contributions_and_drops() -> None:
    from coordinator.ledger.models import RunRow
    from coordinator.rounds import round_statuses

    hops, rounds = round_rows(_hybrid(), "run")
    run = RunRow(id="run", hops=hops)
    rounds[0].status, rounds[0].output_sha256 = "aggregated", "f" * 64
    rounds[0].contributions = [["north", "a" * 64, 50.0]]
    rounds[0].dropped = [["south", "round deadline"]]
    rounds[0].metrics = {"train_loss": 0.25}
    first, second = round_statuses(run, rounds)
    assert [(m.name, list(m.hop_indices)) for m in first.members] == [("north", [0, 1]),
                                                                     ("south", [2])]  # fmt: skip
    assert [(c.member, c.examples) for c in first.contributions] == [("north", 50.0)]
    assert list(first.dropped) == ["south"] and first.metrics["train_loss"] == 0.25
    assert (second.status, second.input_sha256) == ("pending", "")
