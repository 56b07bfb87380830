"""The `baton` CLI: PKI commands, plan errors and the ledger's verify/export."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from sqlalchemy import update
from typer.testing import CliRunner

from coordinator.console.cli import app
from coordinator.ledger import EventRow, Ledger

runner = CliRunner()


def test_pki_init_and_issue_write_certificates_with_private_keys(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    assert runner.invoke(app, ["pki", "init", "--dir", str(pki)]).exit_code == 0
    for args in (["coordinator"], ["site", "st-marys"], ["admin", "alice"]):
        result = runner.invoke(app, ["pki", "issue", *args, "--dir", str(pki)])
        assert result.exit_code == 0, result.output
    for name in ("ca", "coordinator", "st-marys", "alice"):
        assert stat.S_IMODE((pki / f"{name}.key").stat().st_mode) == 0o600
    again = runner.invoke(app, ["pki", "init", "--dir", str(pki)])
    assert again.exit_code == 2
    nameless = runner.invoke(app, ["pki", "issue", "site", "--dir", str(pki)])
    assert nameless.exit_code == 2


def test_run_start_with_a_malformed_plan_fails_before_connecting(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text('dataset = "notes"\nsites = ["x"]\n[defaults]\nsteps = -3\n')
    result = runner.invoke(app, ["run", "start", str(plan), "--coordinator", "localhost:1"])
    assert result.exit_code == 2
    assert "defaults.steps" in result.output


def test_ledger_verify_and_export(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    ledger.migrate()
    for index in range(3):
        ledger.record_event("test.event", payload={"index": index})
    ok = runner.invoke(app, ["ledger", "verify", "--state-dir", str(state)])
    assert ok.exit_code == 0 and "3 events" in ok.output

    out = tmp_path / "events.jsonl"
    exported = runner.invoke(
        app, ["ledger", "export", "--state-dir", str(state), "--out", str(out)]
    )
    assert exported.exit_code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["payload"]["index"] for r in rows] == [0, 1, 2]
    assert rows[1]["prev_hash"] == rows[0]["hash"]

    with ledger.transaction() as session:
        session.execute(update(EventRow).where(EventRow.seq == 2).values(kind="forged"))
    ledger.close()
    broken = runner.invoke(app, ["ledger", "verify", "--state-dir", str(state)])
    assert broken.exit_code == 1 and "event 2" in broken.output


def test_run_bundle_prints_what_sites_approve(tmp_path: Path) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text('dataset = "notes"\nlabels = ["a", "b"]\nsites = ["x", "y"]\n')
    result = runner.invoke(app, ["run", "bundle", str(plan)])
    assert result.exit_code == 0, result.output
    from coordinator.plan import load_plan

    digest = load_plan(plan).approval_bundle().sha256
    assert f"baton-site approve {digest}" in result.output.replace("\n", "")
