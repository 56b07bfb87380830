"""An aggregate-statistics round through real site processes, then a run with its normaliser."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app as baton
from coordinator.ledger import Ledger, StatisticsAnswerRow
from coordinator.plan import parse_plan
from coordinator.statistics import plan_with_normaliser
from protocols.approval import ApprovalBundle
from site_agent.examples import TabularExample
from site_agent.registry import load_registered, register_dataset
from tests.conftest import SITES, Pki, admin_options
from tests.integration.conftest import (
    Cluster,
    collect_heart_statistics,
    run_when_approved,
    start_tabular_sites,
    write_heart_csv,
)

ROWS = {"site-a": 90, "site-b": 70, "site-c": 40}  # about 60% of each is the train split
runner = CliRunner()


def _train_matrix(data_dir: Path) -> np.ndarray:
    train = load_registered(data_dir, "heart").train
    return np.array([row.features for row in train if isinstance(row, TabularExample)])


def _ledger_answers(tmp_path: Path, statistics_id: str) -> list[StatisticsAnswerRow]:
    """The ledger's answers of a statistics request (read after the cluster stopped)."""
    ledger = Ledger(f"sqlite:///{tmp_path / 'coordinator' / 'ledger.sqlite3'}")
    try:
        request = ledger.statistics_request(statistics_id)
        assert request is not None
        return list(request.answers)
    finally:
        ledger.close()


def test_sites_pool_a_global_normaliser_that_a_tabular_run_then_uses(
    pki: Pki, tmp_path: Path
) -> None:
    for index, site in enumerate(SITES):
        write_heart_csv(tmp_path / f"{site}.csv", ROWS[site], seed=index, shift=6 * index)
        register_dataset(tmp_path / site, "heart", tmp_path / f"{site}.csv", task_type="tabular")
    matrices = {site: _train_matrix(tmp_path / site) for site in SITES}
    assert len(matrices["site-c"]) < 30 <= min(len(matrices["site-a"]), len(matrices["site-b"]))

    def bundle(min_count: int) -> str:
        return ApprovalBundle.for_statistics("tabular", "heart", min_count=min_count,
                                             noise_std=0.0).sha256  # fmt: skip

    cluster = Cluster(log_dir=tmp_path / "logs")
    with cluster.running():
        port = start_tabular_sites(cluster, pki, tmp_path, approve=[bundle(10), bundle(30)],
                                   extra=["--max-statistics-answers", "2"])  # fmt: skip
        tls = pki.tls("admin")
        connection = admin_options(port, tls)
        with AdminClient(f"localhost:{port}", tls) as admin:
            admin.wait_for_sites(set(SITES), timeout=60)

            # 1. Every site releases aggregates of its train split; the coordinator pools them.
            collected, statistics_id = collect_heart_statistics(connection, "--wait", "60")
            assert collected.exit_code == 0, collected.output
            assert bundle(10) in collected.output.replace("\n", "")
            status = admin.statistics(statistics_id)

            # 2. site-c holds fewer training rows than 30: it refuses, the request fails.
            small = admin.wait_for_statistics(
                admin.collect_statistics("heart", "tabular", list(SITES), min_count=30)
                .statistics_id, timeout=60,
            )  # fmt: skip

            # 3. A request whose bundle no site approved is refused by every site.
            unapproved = admin.collect_statistics("heart", "tabular", list(SITES), min_count=11)
            assert unapproved.approval_bundle_sha256 == bundle(11)
            unapproved = admin.wait_for_statistics(unapproved.statistics_id, timeout=60)
            # Every site has answered (and recorded the bundle it saw) before approving more.
            deadline = time.monotonic() + 60
            while any(s.status == "pending" for s in unapproved.sites):
                assert time.monotonic() < deadline, unapproved
                time.sleep(0.1)
                unapproved = admin.statistics(unapproved.statistics_id)

            # 4. site-a and site-b have answered 2 requests about heart, their limit; site-c
            #    answered 1 (its refusal below the minimum count released nothing).
            exhausted, exhausted_id = collect_heart_statistics(connection, "--wait", "60")
            assert exhausted.exit_code == 1, exhausted.output
            deadline = time.monotonic() + 60
            while any(s.status == "pending" for s in admin.statistics(exhausted_id).sites):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            shown = runner.invoke(baton, ["statistics", "show", exhausted_id, *connection])

            # 5. A tabular run with the pooled normaliser, approved by its new bundle's hash.
            plan = plan_with_normaliser(parse_plan({
                "name": "normalised", "task": "tabular", "dataset": "heart",
                "labels": ["0", "1"], "sites": list(SITES), "options": {"model": "logistic"},
                "defaults": {"steps": 15, "batch_size": 8, "learning_rate": 0.1},
            }), status)  # fmt: skip
            run = run_when_approved(admin, cluster, plan, tmp_path, timeout=90)

    assert status.status == "done", status.error
    pooled = np.concatenate([matrices[site] for site in SITES])
    assert status.count == len(pooled)
    assert list(status.feature_names) == ["age", "chol", "bp"]
    np.testing.assert_allclose(status.mean, pooled.mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(status.std, pooled.std(axis=0, ddof=1), rtol=0, atol=1e-6)
    assert [(s.site, s.count) for s in status.sites] == [(s, len(matrices[s])) for s in SITES]
    # Only the train splits were pooled: the whole CSV files give other statistics.
    whole = np.concatenate([np.loadtxt(tmp_path / f"{s}.csv", delimiter=",", skiprows=1)[:, :3]
                            for s in SITES])  # fmt: skip
    assert len(whole) == sum(ROWS.values()) > status.count

    assert small.status == "failed" and "site-c: below-minimum-count" in small.error
    by_site = {s.site: s for s in small.sites}
    assert by_site["site-c"].status == "failed"
    assert by_site["site-c"].error.startswith("below-minimum-count")
    assert not small.mean

    assert unapproved.status == "failed"
    assert "not-approved" in unapproved.error and bundle(11) in unapproved.error
    assert all(s.error.startswith("not-approved") for s in unapproved.sites)

    assert shown.exit_code == 0, shown.output
    shown_text = " ".join(shown.output.split())
    assert "statistics failed: site-a: statistics-budget-exhausted" in shown_text or (
        "statistics failed: site-b: statistics-budget-exhausted" in shown_text
    )
    assert "max_statistics_answers 2" in shown_text
    answers = {s.site: s for s in _ledger_answers(tmp_path, exhausted_id)}
    assert answers["site-a"].error_code == answers["site-b"].error_code == (
        "statistics-budget-exhausted")  # fmt: skip
    assert answers["site-c"].status == "done"

    ledger = Ledger(f"sqlite:///{tmp_path / 'coordinator' / 'ledger.sqlite3'}")
    try:
        request = ledger.statistics_request(small.statistics_id)
        assert request is not None
        refused = next(a for a in request.answers if a.site == "site-c")
        assert (refused.status, refused.error_code, refused.aggregates) == (
            "failed", "below-minimum-count", {})  # fmt: skip
        released = [
            e
            for e in ledger.events()
            if e.kind.startswith("statistics.site-")
            and e.payload["statistics_id"] == small.statistics_id
            and e.site == "site-c"
        ]
        assert [(e.kind, e.payload["aggregates"]) for e in released] == [
            ("statistics.site-failed", {})]  # fmt: skip
        assert ledger.verify_chain() is None
    finally:
        ledger.close()

    assert run.status == "completed", run.error
    assert run.approval_bundle_sha256 == plan.approval_bundle().sha256
    config = json.loads((Path(run.final_adapter_dir) / "adapter_config.json").read_text())
    assert config["options"]["normalisation"] == "global"
    assert config["options"]["mean"] == list(status.mean)
    assert config["options"]["std"] == list(status.std)
