"""`baton backup` / `baton restore` of a serving coordinator's ledger and checkpoint store."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app
from coordinator.ledger import Ledger
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from tests.coordinator_tests.conftest import ScriptedSite

runner = CliRunner()


def _said(result: object) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(str(getattr(result, "output", "")).split()).replace("/ ", "/")


def _complete_a_run(sites: dict[str, ScriptedSite], admin: AdminClient) -> str:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    run_id = admin.start_run(parse_plan({"name": "t", "dataset": "notes", "labels": ["x", "y"],
                                         "sites": ["site-a", "site-b"]}))  # fmt: skip
    for name in ("site-a", "site-b"):
        task = sites[name].next_task()
        sites[name].report(task, sites[name].upload(task, sites[name].bundle(task)))
    assert admin.run(run_id).status == "completed"
    return run_id


def test_backup_of_a_serving_coordinator_restores_to_a_verifying_ledger_with_its_checkpoints(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator, tmp_path: Path
) -> None:
    run_id = _complete_a_run(sites, admin)
    state = tmp_path / "state"
    url = coordinator.engine.ledger.url
    args = ["backup", "--out", str(tmp_path / "backup"), "--state-dir", str(state),
            "--database-url", url]  # fmt: skip
    if not url.startswith("sqlite"):
        refused = runner.invoke(app, args)
        assert refused.exit_code == 2
        assert "pg_dump --format=custom" in _said(refused) and "pg_restore" in _said(refused)
        assert "--store-only" in _said(refused)
        stored = runner.invoke(app, [*args, "--store-only"])
        assert stored.exit_code == 0, stored.output
        assert "checkpoint store only" in _said(stored)
        manifest = json.loads((tmp_path / "backup" / "baton-backup.json").read_text())
        assert manifest["ledger"] == "pg_dump" and len(manifest["checkpoints"]) == 2
        restored = runner.invoke(app, ["restore", str(tmp_path / "backup"),
                                       "--state-dir", str(tmp_path / "new")])  # fmt: skip
        assert restored.exit_code == 2 and "pg_restore" in _said(restored)
        return

    made = runner.invoke(app, args)
    assert made.exit_code == 0, made.output
    assert "2 checkpoints" in _said(made)

    target = tmp_path / "restored"
    restored = runner.invoke(app, ["restore", str(tmp_path / "backup"), "--state-dir", str(target)])
    assert restored.exit_code == 0, restored.output
    verify = runner.invoke(app, ["ledger", "verify", "--state-dir", str(target)])
    assert verify.exit_code == 0, verify.output
    ledger = Ledger(f"sqlite:///{target / 'ledger.sqlite3'}")
    try:
        run = ledger.run(run_id)
        assert run.status == "completed"
        assert ledger.head() == coordinator.engine.ledger.head()
        for hop in run.hops:
            assert hop.output_sha256 is not None
            copy = target / "checkpoints" / hop.output_sha256[:2] / hop.output_sha256
            assert copy.read_bytes() == coordinator.engine.store.read(hop.output_sha256)
    finally:
        ledger.close()
    assert (target / "runs" / run_id / "final_adapter" / "adapter_model.safetensors").is_file()

    again = runner.invoke(app, ["restore", str(tmp_path / "backup"), "--state-dir", str(target)])
    assert again.exit_code == 2 and "exists: restore into a new state directory" in _said(again)


def test_restore_refuses_a_backup_with_a_corrupt_checkpoint_and_writes_nothing(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator, tmp_path: Path
) -> None:
    if not coordinator.engine.ledger.url.startswith("sqlite"):
        return  # the SQLite path; PostgreSQL ledgers are restored with pg_restore
    _complete_a_run(sites, admin)
    backup_dir = tmp_path / "backup"
    args = ["backup", "--out", str(backup_dir), "--state-dir", str(tmp_path / "state"),
            "--database-url", coordinator.engine.ledger.url]  # fmt: skip
    made = runner.invoke(app, args)
    assert made.exit_code == 0, made.output
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "is not empty" in _said(again)

    damaged = next((backup_dir / "checkpoints").glob("*/*"))
    damaged.chmod(0o644)
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\0")
    target = tmp_path / "restored"
    result = runner.invoke(app, ["restore", str(backup_dir), "--state-dir", str(target)])
    assert result.exit_code == 2 and f"checkpoint {damaged.name} is corrupt" in _said(result)
    assert not target.exists() and not (tmp_path / "restored.restoring").exists()
