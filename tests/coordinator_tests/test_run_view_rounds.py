"""`baton run status` of a federated or hybrid run: each hop's round and member, each round's
aggregate, contributions with their weights, and drops."""

from __future__ import annotations

from rich.console import Console

from coordinator.console.run_view import rounds_table, run_table
from protocols.v1 import baton_pb2 as pb


def _render(table: object) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def _run() -> pb.RunStatus:
    run = pb.RunStatus(run_id="ab" * 16, name="hybrid", status="running")
    for index, site in enumerate(["a", "b", "c"]):
        run.hops.add(index=index, site=site, status="committed", output_sha256=f"{index}" * 64)
    first = run.rounds.add(number=1, status="aggregated", output_sha256="f" * 64)
    first.members.add(name="north", hop_indices=[0, 1])
    first.members.add(name="south", hop_indices=[2])
    first.contributions.add(member="north", sha256="1" * 64, examples=150)
    first.dropped.append("south")
    first.metrics["train_loss"] = 0.4321
    return run


def test_a_hybrid_runs_hops_show_their_round_and_group() -> None:
    text = _render(run_table(_run()))
    assert "round" in text and "1 north" in text and "1 south" in text


def test_the_rounds_table_shows_inputs_aggregates_weights_and_drops() -> None:
    text = _render(rounds_table(_run()))
    assert "fresh" in text and "f" * 12 in text
    assert "north (150)" in text and "south" in text and "0.432" in text


def test_a_sequential_runs_table_has_no_round_column() -> None:
    run = pb.RunStatus(run_id="cd" * 16, name="seq", status="running")
    run.hops.add(index=0, site="a", status="pending")
    assert "round" not in _render(run_table(run))
