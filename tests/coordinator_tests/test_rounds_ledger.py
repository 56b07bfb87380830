"""Rounds in the ledger: each write rides with one chained event, and verify covers the rows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import inspect, text

from coordinator.ledger import CheckpointRow, HopRow, Ledger, RoundRow, TransitionRefused
from coordinator.ledger._repository import _MIGRATIONS

IN, OUT_A, OUT_B, AGG, STATE = ("a" * 64, "b" * 64, "c" * 64, "d" * 64, "e" * 64)


def _federated_run(ledger: Ledger) -> tuple[str, list[RoundRow]]:
    run_id = uuid.uuid4().hex
    hops = [
        HopRow(id=uuid.uuid4().hex, run_id=run_id, index=i, site=site,
               hyperparameters={"steps": 3}, status="pending", metrics={})
        for i, site in enumerate(["a", "b", "a", "b"])
    ]  # fmt: skip
    rounds = [
        RoundRow(id=uuid.uuid4().hex, run_id=run_id, number=n + 1, status="pending",
                 members=[[h.site, [h.id]] for h in hops[2 * n : 2 * n + 2]],
                 contributions=[], dropped=[], metrics={})
        for n in range(2)
    ]  # fmt: skip
    plan = {"task": "tabular", "dataset": "notes", "mode": "federated"}
    ledger.create_run(run_id, "fed", plan, hops, None, rounds=rounds)
    return run_id, rounds


def _aggregate_row(sha: str, run_id: str, round_id: str) -> CheckpointRow:
    return CheckpointRow(sha256=sha, size=10, run_id=run_id, hop_id=round_id,
                         producer_site="@coordinator", parent_sha256=IN,
                         manifest={"parents": [OUT_A, OUT_B]}, tensors=[["w", "F32", [2]]],
                         signature="ab", producer_certificate="pem",
                         stored_at=datetime.now(UTC))  # fmt: skip


def _aggregate_first_round(ledger: Ledger, run_id: str, first: RoundRow) -> None:
    ledger.start_round(first.id, IN)
    ledger.finish_round(
        first.id,
        checkpoints=[
            _aggregate_row(AGG, run_id, first.id),
            _aggregate_row(STATE, run_id, first.id),
        ],
        output_sha256=AGG,
        server_state_sha256=STATE,
        contributions=[["a", OUT_A, 30.0], ["b", OUT_B, 10.0]],
        dropped=[],
        metrics={"train_loss": 0.5},
    )


def test_a_rounds_start_and_aggregate_are_chained_events_and_verify(ledger: Ledger) -> None:
    run_id, (first, second) = _federated_run(ledger)
    _aggregate_first_round(ledger, run_id, first)
    ledger.start_round(second.id, AGG)
    ledger.fail_round(second.id, "1 contribution, min_sites 2", [["b", "deadline"]])
    kinds = [e.kind for e in ledger.events(run_id)]
    assert kinds == ["run.created", "round.started", "round.aggregated", "round.started",
                     "round.failed"]  # fmt: skip
    aggregated = ledger.events(run_id)[2].payload
    assert aggregated["contributions"] == [["a", OUT_A, 30.0], ["b", OUT_B, 10.0]]
    assert (aggregated["input_sha256"], aggregated["output_sha256"]) == (IN, AGG)
    assert aggregated["server_state_sha256"] == STATE
    assert [r.status for r in ledger.rounds(run_id)] == ["aggregated", "failed"]
    assert ledger.checkpoint(AGG) is not None and ledger.checkpoint(STATE) is not None
    result = ledger.verify()
    assert result.ok, [m.message for m in result.row_mismatches]


def test_a_round_is_aggregated_once_and_started_once(ledger: Ledger) -> None:
    run_id, (first, _) = _federated_run(ledger)
    _aggregate_first_round(ledger, run_id, first)
    with pytest.raises(TransitionRefused, match="round 1 is aggregated"):
        _aggregate_first_round(ledger, run_id, first)
    with pytest.raises(TransitionRefused, match="round 1 is aggregated; cannot fail"):
        ledger.fail_round(first.id, "late", [])
    assert sum(e.kind == "round.aggregated" for e in ledger.events(run_id)) == 1


def test_an_edited_round_row_is_named_by_verify(ledger: Ledger) -> None:
    run_id, (first, _) = _federated_run(ledger)
    _aggregate_first_round(ledger, run_id, first)
    with ledger.engine.begin() as connection:
        connection.execute(
            text("UPDATE rounds SET output_sha256 = :bad WHERE id = :id"), {"bad": OUT_A,
                                                                             "id": first.id}
        )  # fmt: skip
    [mismatch] = ledger.verify().row_mismatches
    assert (mismatch.table, mismatch.column) == ("rounds", "output_sha256")
    assert f"says '{AGG}'" in mismatch.message


def test_the_rounds_migration_goes_down_and_up_again(database_url: str) -> None:
    ledger = Ledger(database_url)
    try:
        ledger.migrate()
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS))
        with ledger.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0015")
            assert "rounds" not in inspect(connection).get_table_names()
        ledger.migrate()
        assert "rounds" in inspect(ledger.engine).get_table_names()
        assert ledger.verify().ok
    finally:
        ledger.close()
