"""A study over run modes through real site processes: trials of several modes run, each
under the sites' approval policies, and are ledgered; a mode a site's policy refuses stops the
study before any run."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coordinator.console._options import console
from coordinator.console.study import trial_run_ids
from coordinator.console.study_cli import study_app
from coordinator.ledger import Ledger
from ordering import OrderingStudy
from protocols.exit_codes import EXIT_BAD_INPUT
from site_agent.registry import register_dataset
from tests.conftest import SITES, Pki
from tests.integration.conftest import Cluster

POLICY = (
    '[[allow]]\ntask_types = ["tabular"]\ndatasets = ["heart"]\nbase_models = ["*"]\n'
    "modes = [{modes}]\n"
)


def _write_csv(path: Path, seed: int, shift: float, rows: int) -> None:
    rng = random.Random(seed)
    lines = ["age,chol,label"]
    for _ in range(rows):
        age, chol = rng.gauss(55 + shift, 8), rng.gauss(230, 40)
        label = int(0.08 * (age - 55) + 0.01 * (chol - 230) + rng.gauss(0, 0.5) > 0)
        lines.append(f"{age:.1f},{chol:.1f},{label}")
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow  # four runs and their evaluations on three site processes: ~35 CPU s
def test_a_study_over_modes_runs_trials_of_several_modes_through_site_approvals(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("coordinator.console.study_cli.configure_logging", lambda *args: None)
    monkeypatch.setattr("coordinator.console.study_cli._quiet_optuna", lambda: None)
    monkeypatch.setattr(console, "width", 300)
    storage = f"sqlite:///{tmp_path / 'studies.sqlite3'}"
    state_dir = tmp_path / "coordinator"
    tls = pki.tls("admin")
    runner = CliRunner()
    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = cluster.start_coordinator(
            state_dir=state_dir, pki_dir=pki.directory, port_file=tmp_path / "port"
        )
        for index, site in enumerate(SITES):
            _write_csv(tmp_path / f"{site}.csv", seed=index, shift=4 * index, rows=80)
            register_dataset(tmp_path / site, "heart", tmp_path / f"{site}.csv",
                             task_type="tabular")  # fmt: skip
            # The last site's policy approves sequential and federated runs, never hybrid.
            modes = '"*"' if index < len(SITES) - 1 else '"sequential", "federated"'
            policy = tmp_path / f"{site}-policy.toml"
            policy.write_text(POLICY.format(modes=modes))
            cluster.start_site(site, coordinator=f"localhost:{port}", pki_dir=pki.directory,
                               data_dir=tmp_path / site, threads=1,
                               extra=["--approval-policy", str(policy)])  # fmt: skip
        args = [
            "start", "--dataset", "heart", "--task", "tabular", "--labels", "0", "--labels", "1",
            "--options", '{"model": "logistic"}',
            *(arg for site in SITES for arg in ("--sites", site)),
            "--cycles", "1", "--lr-min", "0.01", "--lr-max", "0.1", "--steps-min", "4",
            "--steps-max", "8", "--batch-size", "8", "--rounds-min", "1", "--rounds-max", "2",
            "--storage", storage, "--run-timeout", "120", "--site-timeout", "120",
            "--coordinator", f"localhost:{port}", "--ca", str(tls.ca_certificate),
            "--cert", str(tls.certificate), "--key", str(tls.private_key),
        ]  # fmt: skip
        # Hybrid is refused before any run: the last site's policy does not approve it.
        refused = runner.invoke(
            study_app, [*args, "--name", "hybrid", "--modes", "sequential,hybrid", "--trials", "1"]
        )
        assert refused.exit_code == EXIT_BAD_INPUT, refused.output
        text = " ".join(refused.output.split())
        assert f"{SITES[-1]}: its approvals do not allow hybrid (fedavg) runs" in text
        assert f"{SITES[0]}:" not in text

        started = runner.invoke(
            study_app,
            [*args, "--name", "modes", "--modes", "sequential,federated", "--seed", "0",
             "--strategies", "fedavg,fedprox", "--trials", "3"],
        )  # fmt: skip
        assert started.exit_code == 0, started.output
        status = runner.invoke(study_app, ["status", "modes", "--storage", storage])
        assert status.exit_code == 0, status.output

    study = OrderingStudy.load(storage, "modes")
    records = study.history()
    assert [r.state for r in records] == ["COMPLETE"] * 3, [r.error for r in records]
    modes = {r.plan.mode for r in records if r.plan is not None}
    assert modes == {"sequential", "federated"}
    lines = status.output.splitlines()
    for record in records:
        assert record.plan is not None
        [row] = [line for line in lines if line.startswith(f"│ {record.number} ")]
        assert (record.plan.mode in row) and (record.plan.describe() in row), row
    best = study.best_plan()
    assert f"best ({best.mode}): {best.describe()}" in status.output

    links = trial_run_ids(study)
    ledger = Ledger(f"sqlite:///{state_dir / 'ledger.sqlite3'}")
    try:
        verification = ledger.verify()
        assert verification.ok, [m.message for m in verification.row_mismatches]
        for record in records:
            if record.duplicate_of is not None:
                continue
            assert record.plan is not None
            run = ledger.run(links[("modes", record.number)])
            assert run.status == "completed", run.error
            assert run.plan["mode"] == record.plan.mode
            assert [h.status for h in run.hops] == ["committed"] * len(record.plan.hops)
            events = {e.kind for e in ledger.events(run.id)}
            if record.plan.federation is not None:
                assert sum(r.status == "aggregated" for r in ledger.rounds(run.id)) == (
                    record.plan.federation.rounds
                )
                assert "round.aggregated" in events
    finally:
        ledger.close()
