"""Every state row is covered by the event chain: an edit outside the ledger is named by verify."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import event, text
from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app
from coordinator.ledger import (
    CheckpointRow,
    EvaluationRow,
    HopRow,
    Ledger,
    RevocationRow,
    RowMismatch,
    StatisticsAnswerRow,
    StatisticsRequestRow,
    _chain,
)
from coordinator.ledger._integrity import VerifiedEvents
from coordinator.ledger._repository import _MIGRATIONS
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.v1 import baton_pb2 as pb
from tests.conftest import Pki
from tests.coordinator_tests.conftest import ScriptedSite

OUT_A, OUT_B = "a1" * 32, "b2" * 32

# The engine's check of a run (its id) and a checkpoint: the rows and their events it names.
EngineCheck = Callable[[str, str | None], list[RowMismatch]]


@pytest.fixture(params=["objects", "stored"])
def check(request: pytest.FixtureRequest, ledger: Ledger) -> EngineCheck:
    """The check on the run's rows read as ORM objects (`run_mismatches`), or read as stored,
    plain columns with JSON as text (`stored_run_mismatches`, the engine's): same findings."""
    if request.param == "objects":
        return lambda run_id, sha: ledger.run_mismatches(ledger.run(run_id), sha)
    return ledger.stored_run_mismatches


def _hop(run_id: str, index: int, site: str) -> HopRow:
    return HopRow(
        id=uuid.uuid4().hex,
        run_id=run_id,
        index=index,
        site=site,
        hyperparameters={"learning_rate": 1e-4, "steps": 3},
        status="pending",
        metrics={},
    )


def _checkpoint(sha: str, run_id: str, hop_id: str, parent: str | None) -> CheckpointRow:
    return CheckpointRow(
        sha256=sha,
        size=123,
        run_id=run_id,
        hop_id=hop_id,
        producer_site="site-a",
        parent_sha256=parent,
        manifest={"run_id": run_id, "note": "x" * 300},
        tensors=[["lora_A", "F32", [4, 2]]],
        signature="ab",
        producer_certificate="-----BEGIN CERTIFICATE-----",
        stored_at=datetime.now(UTC),
    )


def populate(ledger: Ledger) -> dict[str, str]:
    """A ledger with a row in every state table, written through the repository."""
    for site in ("site-a", "site-b"):
        ledger.register_site(
            site,
            agent_version="1",
            capabilities=["tabular"],
            base_models=[],
            datasets=[{"name": "notes"}],
            certificate_serial="1f",
        )
    run_id = uuid.uuid4().hex
    hops = [_hop(run_id, 0, "site-a"), _hop(run_id, 1, "site-b")]
    ledger.create_run(run_id, "r", {"task": "tabular", "dataset": "notes"}, hops, None)
    ledger.lease_hop(hops[0].id, "tok", None)
    ledger.record_checkpoint(_checkpoint(OUT_A, run_id, hops[0].id, None))
    ledger.commit_hop(
        hops[0].id,
        lease_token="tok",
        output_sha256=OUT_A,
        metrics={"accuracy": 0.5},
        train_started_at_ns=1,
        train_finished_at_ns=2,
        base_model_sha256="cd" * 32,
    )
    evaluation = EvaluationRow(
        id=uuid.uuid4().hex,
        run_id=run_id,
        checkpoint_sha256=OUT_A,
        site="site-b",
        split="validation",
        status="pending",
        lease_token="ev",
        metrics={},
        created_at=datetime.now(UTC),
    )
    ledger.create_evaluations([evaluation])
    ledger.finish_evaluation(evaluation.id, metrics={"accuracy": 0.75})
    ledger.revoke("2a", reason="lost laptop", by="admin")
    request = StatisticsRequestRow(
        id=uuid.uuid4().hex,
        dataset="notes",
        task_type="tabular",
        min_count=10,
        noise_std=0.0,
        sites=["site-a"],
        status="pending",
        combined={},
        created_at=datetime.now(UTC),
    )
    answer = StatisticsAnswerRow(site="site-a", status="pending", lease_token="st", aggregates={})
    ledger.create_statistics(request, [answer], approval_bundle_sha256="ee" * 32)
    ledger.finish_statistics_answer(
        request.id, "site-a", lease_token="st", aggregates={"count": 12.0}
    )
    ledger.settle_statistics(request.id, status="done", combined={"count": 12.0})
    return {
        "run": run_id,
        "hop0": hops[0].id,
        "hop1": hops[1].id,
        "evaluation": evaluation.id,
        "statistics": request.id,
    }


def _sql(ledger: Ledger, statement: str, **params: object) -> None:
    with ledger.engine.begin() as connection:
        connection.execute(text(statement), params)


def test_rows_written_through_the_repository_verify(ledger: Ledger) -> None:
    populate(ledger)
    result = ledger.verify()
    assert result.ok, [m.message for m in result.row_mismatches]
    assert result.events == result.last_seq and result.head == ledger.head()


@pytest.mark.parametrize(
    ("table", "column", "statement", "says"),
    [
        (
            "hops",
            "output_sha256",
            "UPDATE hops SET output_sha256 = :bad WHERE id = :hop0",
            f"says '{OUT_A}'",
        ),
        (
            "runs",
            "plan",
            'UPDATE runs SET plan = \'{"task": "tabular", "dataset": "other"}\' WHERE id = :run',
            "table says",
        ),
        (
            "evaluations",
            "metrics",
            "UPDATE evaluations SET metrics = '{\"accuracy\": 0.99}' WHERE id = :evaluation",
            "says '{\"accuracy\":0.75}'",
        ),
        (
            "statistics_requests",
            "combined",
            "UPDATE statistics_requests SET combined = '{\"count\": 99.0}' WHERE id = :statistics",
            "table says",
        ),
        (
            "sites",
            "certificate_serial",
            "UPDATE sites SET certificate_serial = 'ff' WHERE name = 'site-a'",
            "says '1f'",
        ),
        (
            "revocations",
            "reason",
            "UPDATE revocations SET reason = 'x' WHERE serial = '2a'",
            "says 'lost laptop'",
        ),
    ],
)
def test_edited_column_is_named_with_table_row_and_event(
    ledger: Ledger, table: str, column: str, statement: str, says: str
) -> None:
    ids = populate(ledger)
    _sql(ledger, statement, bad=OUT_B, **ids)
    result = ledger.verify()
    assert result.chain_break is None and not result.ok
    [mismatch] = result.row_mismatches
    assert (mismatch.table, mismatch.column) == (table, column)
    assert mismatch.message.startswith(f"{table} row ") and f"column {column}: ledger event #" in (
        mismatch.message
    )
    assert says in mismatch.message


def test_edited_checkpoint_digest_is_named_both_ways(ledger: Ledger) -> None:
    populate(ledger)
    _sql(ledger, "UPDATE checkpoints SET sha256 = :bad WHERE sha256 = :good", bad=OUT_B, good=OUT_A)
    messages = sorted(m.message for m in ledger.verify().row_mismatches)
    assert messages[0].startswith(f"checkpoints row {OUT_A}: ledger event #")
    assert messages[0].endswith("the table has no such row (deleted)")
    assert messages[1] == f"checkpoints row {OUT_B} has no ledger event that wrote it"


def test_row_inserted_without_an_event_is_named(ledger: Ledger) -> None:
    populate(ledger)
    _sql(
        ledger,
        "INSERT INTO revocations (serial, reason, revoked_by, revoked_at) "
        "VALUES ('99', 'forged', 'nobody', '2026-01-01 00:00:00')",
    )
    [mismatch] = ledger.verify().row_mismatches
    assert mismatch.message == "revocations row 99 has no ledger event that wrote it"


def test_pointing_a_row_at_an_older_event_is_named(ledger: Ledger) -> None:
    ids = populate(ledger)
    _sql(ledger, "UPDATE hops SET ledger_seq = 1 WHERE id = :hop0", **ids)
    [mismatch] = ledger.verify().row_mismatches
    assert mismatch.column == "ledger_seq" and "column ledger_seq: ledger event #" in (
        mismatch.message
    )


def test_engine_check_names_the_edited_hop_of_a_run(ledger: Ledger, check: EngineCheck) -> None:
    ids = populate(ledger)
    assert check(ids["run"], OUT_A) == []
    _sql(ledger, "UPDATE hops SET output_sha256 = :bad WHERE id = :hop0", bad=OUT_B, **ids)
    _sql(ledger, "UPDATE checkpoints SET size = 1 WHERE sha256 = :good", good=OUT_A)
    found = check(ids["run"], OUT_A)
    assert [(m.table, m.column) for m in found] == [
        ("hops", "output_sha256"),
        ("checkpoints", "size"),
    ]


def test_engine_check_names_a_checkpoint_deleted_behind_the_ledger(
    ledger: Ledger, check: EngineCheck
) -> None:
    ids = populate(ledger)
    assert check(ids["run"], OUT_A) == []
    _sql(ledger, "DELETE FROM evaluations")  # they refer to the checkpoint
    _sql(ledger, "DELETE FROM checkpoints WHERE sha256 = :good", good=OUT_A)
    found = check(ids["run"], OUT_A)
    assert [m.message for m in found] == [f"checkpoints row {OUT_A} is missing"]


def test_engine_check_refuses_an_event_edited_to_match_its_row(
    ledger: Ledger, check: EngineCheck
) -> None:
    ids = populate(ledger)
    hop = ledger.hop(ids["hop0"])
    assert hop is not None and hop.ledger_seq is not None
    _sql(ledger, "UPDATE events SET payload = '{}' WHERE seq = :seq", seq=hop.ledger_seq)
    found = {m.message for m in check(ids["run"], None)}
    # The commit event also pinned the run's base model: both rows name the altered event.
    assert found == {
        f"{table} row {key}: its ledger event #{hop.ledger_seq} does not verify (event altered)"
        for table, key in (("hops", ids["hop0"]), ("runs", ids["run"]))
    }


def test_rows_from_before_the_upgrade_get_a_baseline_event(empty_database_url: str) -> None:
    ledger = Ledger(empty_database_url)
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with ledger.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0006")
        connection.execute(
            text(
                "INSERT INTO runs (id, name, status, plan, created_at) "
                "VALUES ('r1', 'old', 'completed', '{\"task\": \"tabular\"}', "
                "'2026-01-01 00:00:00')"
            )
        )
        connection.execute(
            text(
                "INSERT INTO events (at, kind, payload, prev_hash, hash) VALUES "
                "('2026-01-01T00:00:00', 'old.event', '{}', :genesis, :hash)"
            ),
            {"genesis": "0" * 64, "hash": _old_hash()},
        )
    try:
        ledger.migrate()
        result = ledger.verify()
        assert result.ok, [m.message for m in result.row_mismatches]
        baseline = ledger.events()[-1]
        assert baseline.kind == "ledger.baseline" and baseline.payload["table"] == "runs"
        _sql(ledger, "UPDATE runs SET status = 'running' WHERE id = 'r1'")
        [mismatch] = ledger.verify().row_mismatches
        assert mismatch.message == (
            f"runs row r1 column status: ledger event #{baseline.seq} "
            "says 'completed', table says 'running'"
        )
    finally:
        ledger.close()


def _old_hash() -> str:
    from coordinator.ledger import GENESIS_HASH, event_hash

    return event_hash(GENESIS_HASH, "2026-01-01T00:00:00", "old.event", None, None, None, {})


def test_dispatch_from_an_edited_hop_row_pauses_the_run(
    pki: Pki, coordinator: Coordinator, admin: AdminClient
) -> None:
    site_a, site_b = (ScriptedSite(pki, name, coordinator.port) for name in ("site-a", "site-b"))
    try:
        site_a.connect()
        site_b.hello()  # known to the coordinator, but not yet asking for work
        run_id = admin.start_run(
            parse_plan(
                {
                    "name": "t",
                    "dataset": "notes",
                    "labels": ["x", "y"],
                    "sites": ["site-a", "site-b"],
                }
            ),
            allow_offline=True,  # site-b is known but not connected yet
        )
        task = site_a.next_task()
        ref = site_a.upload(task, site_a.bundle(task))
        assert site_a.report(task, ref) == "committed"
        ledger = coordinator.engine.ledger
        _sql(
            ledger,
            "UPDATE hops SET output_sha256 = :bad WHERE id = :hop",
            bad=OUT_B,
            hop=task.hop_id,
        )
        site_b.connect()
        status = _paused(admin, run_id)
        assert status.error.startswith(
            f"ledger mismatch: hops row {task.hop_id} column output_sha256: ledger event #"
        )
        assert f"says '{ref.sha256}', table says '{OUT_B}'" in status.error
        assert site_b.tasks.empty()
        assert [h.status for h in status.hops] == ["committed", "pending"]
        mismatch = [e for e in ledger.events(run_id) if e.kind == "ledger.mismatch"]
        assert mismatch and mismatch[0].payload["mismatches"][0]["column"] == "output_sha256"
        verification = ledger.verify()
        assert verification.recorded_mismatches[0][0] == mismatch[0].seq
    finally:
        site_a.close()
        site_b.close()


def test_a_committed_hop_edited_between_two_commits_pauses_the_run_at_the_next(
    pki: Pki, coordinator: Coordinator, admin: AdminClient
) -> None:
    """Hop 0's row is edited after later commits checked it (its event is known sound)."""
    sites = {name: ScriptedSite(pki, name, coordinator.port) for name in ("site-a", "site-b")}
    try:
        for site in sites.values():
            site.connect()
        admin.wait_for_sites(set(sites), timeout=60)  # streams open: online, not just known
        run_id = admin.start_run(
            parse_plan({"name": "t", "dataset": "notes", "labels": ["x", "y"],
                        "sites": ["site-a", "site-b"], "cycles": 2})
        )  # fmt: skip
        tasks = []
        for name in ("site-a", "site-b"):
            task = sites[name].next_task()
            ref = sites[name].upload(task, sites[name].bundle(task))
            assert sites[name].report(task, ref) == "committed"
            tasks.append(task)
        ledger = coordinator.engine.ledger
        assert ledger.hop(tasks[0].hop_id).ledger_seq in ledger.verified_events  # type: ignore[union-attr]
        _sql(ledger, "UPDATE hops SET metrics = '{\"accuracy\": 0.99}' WHERE id = :hop",
             hop=tasks[0].hop_id)  # fmt: skip
        task = sites["site-a"].next_task()  # hop 2, leased with hop 1's commit
        ref = sites["site-a"].upload(task, sites["site-a"].bundle(task))
        sites["site-a"].report(task, ref)
        status = _paused(admin, run_id)
        assert status.error.startswith(
            f"ledger mismatch: hops row {tasks[0].hop_id} column metrics: ledger event #"
        )
        assert [h.status for h in status.hops][3] == "pending"
        assert sites["site-b"].tasks.empty()
    finally:
        for site in sites.values():
            site.close()


def _paused(admin: AdminClient, run_id: str) -> pb.RunStatus:
    deadline = time.monotonic() + 60
    while (status := admin.run(run_id)).status != "paused" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert status.status == "paused", status
    return status


def test_cli_verify_names_the_edited_row_and_exits_1(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    ledger.migrate()
    ids = populate(ledger)
    verify = ["ledger", "verify", "--state-dir", str(state)]
    ok = CliRunner().invoke(app, verify)
    assert ok.exit_code == 0 and "every state row matches the event that last wrote it" in ok.output
    _sql(ledger, "UPDATE hops SET output_sha256 = :bad WHERE id = :hop0", bad=OUT_B, **ids)
    ledger.close()
    result = CliRunner().invoke(app, verify)
    assert result.exit_code == 1
    assert f"error: hops row {ids['hop0']} column output_sha256: ledger event #" in result.output
    assert f"says '{OUT_A}', table says '{OUT_B}'" in result.output


def test_cli_verify_of_a_ledger_from_before_row_snapshots_checks_the_chain_only(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    with ledger.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0006")
    ledger.close()
    result = CliRunner().invoke(app, ["ledger", "verify", "--state-dir", str(state)])
    assert result.exit_code == 0, result.output
    assert "state rows NOT checked: the schema predates row snapshots" in result.output


def test_a_state_row_written_without_an_event_is_rolled_back(ledger: Ledger) -> None:
    populate(ledger)
    with (
        pytest.raises(
            RuntimeError, match="state rows written without a ledger event: revocations 77"
        ),
        ledger.transaction() as session,
    ):
        session.add(
            RevocationRow(serial="77", reason="x", revoked_by="y", revoked_at=datetime.now(UTC))
        )
    assert "77" not in ledger.revocations()
    assert ledger.verify().ok


def test_pausing_and_resuming_never_adopts_an_edited_plan(
    pki: Pki, coordinator: Coordinator, admin: AdminClient
) -> None:
    site_a, site_b = (ScriptedSite(pki, name, coordinator.port) for name in ("site-a", "site-b"))
    try:
        site_a.connect()
        site_b.hello()
        plan = {
            "name": "t",
            "dataset": "notes",
            "labels": ["x", "y"],
            "sites": ["site-a", "site-b"],
        }
        run_id = admin.start_run(parse_plan(plan), allow_offline=True)
        task = site_a.next_task()
        assert site_a.report(task, site_a.upload(task, site_a.bundle(task))) == "committed"
        ledger = coordinator.engine.ledger
        with ledger.engine.connect() as connection:
            original = connection.execute(
                text("SELECT plan FROM runs WHERE id = :id"), {"id": run_id}
            ).scalar_one()
        edited = (
            original.replace('"notes"', '"other-notes"')
            if isinstance(original, str)
            else (json.dumps({**original, "dataset": "other-notes"}))
        )
        _sql(ledger, "UPDATE runs SET plan = :plan WHERE id = :id", plan=edited, id=run_id)
        site_b.connect()
        assert "runs row " + run_id + " column plan: ledger event #" in _paused(admin, run_id).error
        admin.control(
            run_id, "resume"
        )  # the resume's own write must not make the edited plan look recorded
        status = _paused(admin, run_id)
        assert f"runs row {run_id} column plan" in status.error and site_b.tasks.empty()
        assert [m.table for m in ledger.verify().row_mismatches] == ["runs"]
        restored = original if isinstance(original, str) else json.dumps(original)
        _sql(ledger, "UPDATE runs SET plan = :plan WHERE id = :id", plan=restored, id=run_id)
        admin.control(run_id, "resume")
        assert site_b.next_task().hop_index == 1
        verification = ledger.verify()
        assert verification.ok and len(verification.recorded_mismatches) == 2
    finally:
        site_a.close()
        site_b.close()


def test_final_adapter_is_not_exported_from_an_edited_checkpoint_row(
    pki: Pki, coordinator: Coordinator, admin: AdminClient
) -> None:
    site = ScriptedSite(pki, "site-a", coordinator.port)
    try:
        site.connect()
        admin.wait_for_sites({"site-a"}, timeout=60)  # its stream open: online, not just known
        plan = {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": ["site-a"]}
        run_id = admin.start_run(parse_plan(plan))
        task = site.next_task()
        ref = site.upload(task, site.bundle(task))
        _sql(
            coordinator.engine.ledger,
            "UPDATE checkpoints SET producer_site = 'site-b' WHERE sha256 = :sha",
            sha=ref.sha256,
        )
        assert site.report(task, ref) == "committed"  # the hop commits; the run does not finish
        status = _paused(admin, run_id)
        assert status.error.startswith(
            f"ledger mismatch: checkpoints row {ref.sha256} column producer_site: ledger event #"
        )
        assert not status.final_sha256
        assert not coordinator.engine.final_adapter_dir(run_id).exists()
    finally:
        site.close()


def test_verify_reads_rows_and_events_in_batches_and_names_the_same_findings(
    ledger: Ledger,
) -> None:
    ids = populate(ledger)
    _sql(ledger, "UPDATE hops SET output_sha256 = :bad WHERE id = :hop0", bad=OUT_B, **ids)
    _sql(ledger, "UPDATE hops SET ledger_seq = 1 WHERE id = :hop1", **ids)
    _sql(ledger, "UPDATE revocations SET reason = 'x' WHERE serial = '2a'")
    whole = sorted(m.message for m in ledger.verify(chunk=1000).row_mismatches)
    assert sorted(m.message for m in ledger.verify(chunk=1).row_mismatches) == whole
    assert len(whole) == 3


def test_a_row_put_back_after_its_deletion_was_recorded_is_named(ledger: Ledger) -> None:
    populate(ledger)
    with ledger.transaction() as session:
        row = session.get(RevocationRow, "2a")
        assert row is not None
        session.delete(row)
        deleted_at = ledger.append_event(session, "site.unrevoked", payload={"serial": "2a"})
    assert ledger.verify().ok
    _sql(
        ledger,
        "INSERT INTO revocations (serial, reason, revoked_by, revoked_at) "
        "VALUES ('2a', 'lost laptop', 'admin', '2026-01-01 00:00:00')",
    )
    [mismatch] = ledger.verify().row_mismatches
    assert mismatch.message == (
        f"revocations row 2a has no ledger event that wrote it (event #{deleted_at.seq} deleted it)"
    )


def test_engine_check_hashes_an_unchanged_event_once(
    ledger: Ledger, check: EngineCheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = populate(ledger)
    # As a process that did not append these events (a restart) finds them: not known sound
    # as stored yet (an appending process knows its own: `VerifiedEvents.appended`).
    ledger.verified_events = VerifiedEvents()
    hashed: list[str] = []
    real = _chain.event_hash

    def counting(*fields: Any) -> str:
        hashed.append(fields[2])
        return real(*fields)

    monkeypatch.setattr(_chain, "event_hash", counting)
    assert check(ids["run"], OUT_A) == []
    assert hashed  # the first check recomputes every event it reads
    hashed.clear()
    assert check(ids["run"], OUT_A) == []
    assert hashed == []  # stored as verified: not hashed again
    hop = ledger.hop(ids["hop0"])
    assert hop is not None and hop.ledger_seq is not None
    _sql(ledger, "UPDATE events SET payload = '{}' WHERE seq = :seq", seq=hop.ledger_seq)
    assert check(ids["run"], OUT_A)
    assert hashed  # changed: recomputed, and refused


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET payload = '{}' WHERE seq = :seq",
        "UPDATE events SET at = '2000-01-01T00:00:00.000000+00:00' WHERE seq = :seq",
        "UPDATE events SET kind = 'hop.leased' WHERE seq = :seq",
        "UPDATE events SET site = 'site-b' WHERE seq = :seq",
        "UPDATE events SET run_id = NULL WHERE seq = :seq",
        "UPDATE events SET prev_hash = :bad WHERE seq = :seq",
        "UPDATE events SET hash = :bad WHERE seq = :seq",
    ],
    ids=["payload", "at", "kind", "site", "run_id", "prev_hash", "hash"],
)
def test_engine_check_refuses_an_event_altered_after_it_verified(
    ledger: Ledger, check: EngineCheck, statement: str
) -> None:
    ids = populate(ledger)
    hop = ledger.hop(ids["hop0"])
    assert hop is not None and hop.ledger_seq is not None
    assert check(ids["run"], OUT_A) == []
    assert hop.ledger_seq in ledger.verified_events
    _sql(ledger, statement, seq=hop.ledger_seq, bad=OUT_B)
    found = {m.message for m in check(ids["run"], OUT_A)}
    # (an altered prev_hash also breaks the link from the event before: its rows are named too)
    assert found >= {
        f"{table} row {key}: its ledger event #{hop.ledger_seq} does not verify (event altered)"
        for table, key in (("hops", ids["hop0"]), ("runs", ids["run"]))
    }
    assert all(message.endswith("does not verify (event altered)") for message in found)


def test_engine_check_refuses_a_row_and_its_event_rewritten_with_a_new_hash_after_it_verified(
    ledger: Ledger,
    check: EngineCheck,
) -> None:
    ids = populate(ledger)
    assert check(ids["run"], OUT_A) == []
    hop = ledger.hop(ids["hop0"])
    assert hop is not None and hop.ledger_seq is not None
    event = ledger.event_at(hop.ledger_seq)
    assert event is not None
    payload = json.loads(json.dumps(event.payload))
    [entry] = [e for e in payload["state_rows"] if e["key"] == ids["hop0"]]
    entry["values"]["output_sha256"] = OUT_B
    digest = _chain.event_hash(
        event.prev_hash, event.at, event.kind, event.run_id, event.hop_id, event.site, payload
    )
    # Row, event and the event's hash agree again: only the next event's link tells.
    _sql(
        ledger,
        "UPDATE events SET payload = :payload, hash = :digest WHERE seq = :seq",
        payload=json.dumps(payload),
        digest=digest,
        seq=event.seq,
    )
    _sql(ledger, "UPDATE hops SET output_sha256 = :bad WHERE id = :hop0", bad=OUT_B, **ids)
    found = {m.message for m in check(ids["run"], OUT_A)}
    assert f"hops row {ids['hop0']}: its ledger event #{event.seq} does not verify " in (
        " ".join(found)
    )


def test_engine_check_names_a_row_edited_between_two_checks_and_follows_it_back(
    ledger: Ledger,
    check: EngineCheck,
) -> None:
    ids = populate(ledger)
    assert check(ids["run"], OUT_A) == []
    # hop 0 committed before the last check: its event verified and is not hashed again
    _sql(ledger, "UPDATE hops SET metrics = '{\"accuracy\": 0.99}' WHERE id = :hop0", **ids)
    _sql(ledger, "UPDATE checkpoints SET producer_site = 'site-b' WHERE sha256 = :good", good=OUT_A)
    found = check(ids["run"], OUT_A)
    assert [(m.table, m.key, m.column) for m in found] == [
        ("hops", ids["hop0"], "metrics"),
        ("checkpoints", OUT_A, "producer_site"),
    ]
    _sql(ledger, "UPDATE hops SET metrics = '{\"accuracy\": 0.5}' WHERE id = :hop0", **ids)
    _sql(ledger, "UPDATE checkpoints SET producer_site = 'site-a' WHERE sha256 = :good", good=OUT_A)
    assert check(ids["run"], OUT_A) == []  # no finding remembered


def test_engine_check_refuses_an_event_that_is_no_json_any_more(
    ledger: Ledger, check: EngineCheck
) -> None:
    ids = populate(ledger)
    hop = ledger.hop(ids["hop0"])
    assert hop is not None and hop.ledger_seq is not None
    assert check(ids["run"], OUT_A) == []
    if ledger.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's json type refuses text that is not JSON")
    _sql(ledger, "UPDATE events SET payload = 'not json' WHERE seq = :seq", seq=hop.ledger_seq)
    found = {m.message for m in check(ids["run"], OUT_A)}
    assert f"hops row {ids['hop0']}: its ledger event #{hop.ledger_seq} does not verify " in (
        " ".join(found)
    )


def test_engine_check_names_a_value_equal_in_python_but_not_in_its_snapshot(
    ledger: Ledger,
    check: EngineCheck,
) -> None:
    ids = populate(ledger)
    assert check(ids["run"], OUT_A) == []  # every row matched
    # 3 == 3.0 in Python; the ledger recorded 3: a row matched before must be compared again.
    _sql(ledger, "UPDATE hops SET hyperparameters = :value WHERE id = :hop1",
         value='{"learning_rate": 0.0001, "steps": 3.0}', **ids)  # fmt: skip
    found = check(ids["run"], OUT_A)
    assert [(m.table, m.key, m.column) for m in found] == [("hops", ids["hop1"], "hyperparameters")]
    assert '"steps":3.0' in found[0].message


def test_a_write_after_a_check_does_not_adopt_a_column_edited_behind_the_ledger(
    ledger: Ledger,
    check: EngineCheck,
) -> None:
    ids = populate(ledger)
    assert check(ids["run"], OUT_A) == []
    hop = ledger.hop(ids["hop1"])
    assert hop is not None and hop.ledger_seq in ledger.verified_events  # recorded entry known
    _sql(ledger, "UPDATE hops SET hyperparameters = :value WHERE id = :hop1",
         value='{"learning_rate": 0.5, "steps": 3}', **ids)  # fmt: skip
    ledger.lease_hop(ids["hop1"], "tok1", OUT_A)  # writes the row's lease columns only
    found = check(ids["run"], OUT_A)
    assert [(m.table, m.key, m.column) for m in found] == [("hops", ids["hop1"], "hyperparameters")]
    assert '\'{"learning_rate":0.0001' in found[0].message
    assert ledger.verify().row_mismatches == found


def test_a_hand_backs_transaction_reads_its_hop_once_and_records_it_as_written_apart(
    ledger: Ledger,
) -> None:
    # One transaction moves the hop to uploaded, then commits it: the hop is read (and locked)
    # once, the commit's snapshot carries the upload's forward without reading that event back,
    # and the rows still match their events (the engine's check and a full verify).
    run_id = uuid.uuid4().hex
    hops = [_hop(run_id, 0, "site-a"), _hop(run_id, 1, "site-b")]
    ledger.create_run(run_id, "r", {"task": "tabular", "dataset": "notes"}, hops, None)
    ledger.lease_hop(hops[0].id, "tok", None)
    statements: list[tuple[str, object]] = []

    def note(
        _conn: object, _cursor: object, statement: str, parameters: object, *_: object
    ) -> None:
        statements.append((" ".join(statement.split()), parameters))

    event.listen(ledger.engine, "before_cursor_execute", note)
    try:
        with ledger.transaction():
            ledger.record_checkpoint(_checkpoint(OUT_A, run_id, hops[0].id, None))
            ledger.transition_hop(
                hops[0].id, expected=("leased",), status="uploaded", event="hop.uploaded",
                payload={"output_sha256": OUT_A},
            )  # fmt: skip
            ledger.commit_hop(hops[0].id, lease_token="tok", output_sha256=OUT_A,
                              metrics={"accuracy": 0.5}, train_started_at_ns=1,
                              train_finished_at_ns=2, base_model_sha256="ab" * 32)  # fmt: skip
    finally:
        event.remove(ledger.engine, "before_cursor_execute", note)
    hop_reads = [s for s, _ in statements if s.startswith("SELECT") and "FROM hops" in s]
    assert len(hop_reads) == 1, hop_reads
    uploaded_seq = max(e.seq for e in ledger.events() if e.kind == "hop.uploaded")
    event_reads = [p for s, p in statements if s.startswith("SELECT") and "FROM events" in s]
    assert event_reads and all(_names(p, uploaded_seq) is False for p in event_reads)
    committed = next(e for e in ledger.events() if e.kind == "hop.committed")
    [entry] = [e for e in committed.payload["state_rows"] if e["table"] == "hops"]
    assert entry["values"]["status"] == "committed" and entry["values"]["lease_token"] is None
    assert ledger.stored_run_mismatches(run_id, OUT_A) == []
    assert ledger.verify().ok
    assert ledger.last_seq() == committed.seq and ledger.known_head() == committed.hash


def _names(parameters: object, seq: int) -> bool:
    """Whether a statement's bound parameters hold `seq`."""
    values = parameters.values() if isinstance(parameters, dict) else parameters
    return seq in tuple(values)  # type: ignore[arg-type]


def test_a_text_column_turned_into_bytes_behind_the_ledger_is_named(
    ledger: Ledger, check: EngineCheck
) -> None:
    """SQLite keeps whatever storage class an UPDATE writes: the same characters as a BLOB
    come back as bytes, which no snapshot holds. Named as an edit, never a crash."""
    if ledger.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL refuses bytes in a text column")
    ids = populate(ledger)
    assert check(ids["run"], OUT_A) == []
    _sql(ledger, "UPDATE hops SET output_sha256 = CAST(output_sha256 AS BLOB) WHERE id = :hop0",
         **ids)  # fmt: skip
    found = check(ids["run"], OUT_A)
    assert [(m.table, m.key, m.column) for m in found] == [("hops", ids["hop0"], "output_sha256")]
    [mismatch] = ledger.verify().row_mismatches
    assert (mismatch.table, mismatch.column) == ("hops", "output_sha256")
    assert "bytes" in mismatch.message
