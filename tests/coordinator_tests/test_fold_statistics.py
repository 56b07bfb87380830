"""Per-fold statistics at the coordinator: pooling per fold, the round over gRPC, the ledger."""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app
from coordinator.console.study._records import RunTemplate
from coordinator.plan import PlanError, parse_plan
from coordinator.server import Coordinator
from coordinator.statistics import (
    CombinedStatistics,
    FoldAggregates,
    SiteAggregates,
    StatisticsMismatch,
    combine,
    fold_normaliser_options,
    plan_with_normaliser,
)
from ordering import CandidatePlan
from protocols.approval import ApprovalBundle
from protocols.hyperparameters import HopHyperparameters
from protocols.statistics import FOLD_NORMALISERS_OPTION
from protocols.v1 import baton_pb2 as pb
from tests.conftest import Pki, admin_options
from tests.coordinator_tests.conftest import WAIT, ScriptedSite, request_heart_statistics
from tests.coordinator_tests.conftest import next_statistics_task as _next_statistics
from tests.coordinator_tests.conftest import statistics_request as _request
from tests.coordinator_tests.conftest import statistics_result as _result

FEATURES = ("age", "chol", "bp")
runner = CliRunner()


def _site(seed: int, n: int, folds: int) -> tuple[np.ndarray, np.ndarray]:
    """A site's training rows (shifted, differently spread per seed) and each row's fold."""
    rng = np.random.default_rng(seed)
    rows = rng.normal([55 + 5 * seed, 230 - 9 * seed, 130], [8 + seed, 40, 15], size=(n, 3))
    return rows, rng.permutation(np.arange(n) % folds)


def _aggregates(site: str, rows: np.ndarray, fold_ids: np.ndarray, folds: int) -> SiteAggregates:
    """What a site releases for a per-fold request: the split's and each fold's training part's
    count, sums and sums of squares."""
    parts = [rows[fold_ids != fold] for fold in range(folds)]
    return SiteAggregates(
        site=site,
        count=float(len(rows)),
        feature_names=FEATURES,
        feature_sums=tuple(rows.sum(axis=0)),
        feature_sums_of_squares=tuple((rows**2).sum(axis=0)),
        folds=tuple(
            FoldAggregates(fold, float(len(p)), tuple(p.sum(axis=0)), tuple((p**2).sum(axis=0)))
            for fold, p in enumerate(parts)
        ),
    )


# ---- pooling per fold ---------------------------------------------------------------------------


@pytest.mark.parametrize("folds", [2, 3, 5])
def test_fold_normalisers_pool_every_sites_rows_outside_the_fold(folds: int) -> None:
    sites = [_site(seed, n, folds) for seed, n in enumerate((120, 47, 300))]
    combined = combine(
        [_aggregates(f"s{i}", rows, ids, folds) for i, (rows, ids) in enumerate(sites)],
        cv_folds=folds,
    )

    assert [f.fold for f in combined.folds] == list(range(folds))
    everything = np.concatenate([rows for rows, _ in sites])
    for fold in combined.folds:
        training = np.concatenate([rows[ids != fold.fold] for rows, ids in sites])
        assert fold.count == len(training)
        np.testing.assert_allclose(fold.mean, training.mean(axis=0), rtol=0, atol=1e-9)
        np.testing.assert_allclose(fold.std, training.std(axis=0, ddof=1), rtol=0, atol=1e-9)
        # Not the global normaliser: the fold's held-out rows are left out.
        assert not np.allclose(fold.mean, everything.mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(combined.mean, everything.mean(axis=0), rtol=0, atol=1e-9)
    # Stored with the request and read back unchanged; results without folds keep their shape.
    assert CombinedStatistics.from_json(combined.to_json()) == combined
    plain = combine([_aggregates("s0", *sites[0], 0)])
    assert not plain.folds and "folds" not in plain.to_json()


def test_a_folds_held_out_rows_change_its_normaliser_not_at_all() -> None:
    rows, ids = _site(3, 90, 3)
    other = rows.copy()
    other[ids == 1] *= 3.0  # only fold 1's held-out rows differ
    before = combine([_aggregates("s", rows, ids, 3)], cv_folds=3)
    after = combine([_aggregates("s", other, ids, 3)], cv_folds=3)

    assert after.folds[1] == before.folds[1]
    assert after.folds[0] != before.folds[0] and after.folds[2] != before.folds[2]
    assert after.mean != before.mean


def test_sites_that_release_other_folds_cannot_be_pooled() -> None:
    rows, ids = _site(1, 60, 3)
    three = _aggregates("s1", rows, ids, 3)
    with pytest.raises(StatisticsMismatch, match="site s1 released 3 folds; the request asked"):
        combine([three], cv_folds=2)
    with pytest.raises(StatisticsMismatch, match="site s2 released 0 folds; the request asked"):
        combine([three, _aggregates("s2", rows, ids, 0)], cv_folds=3)
    with pytest.raises(StatisticsMismatch, match=r"released folds \[1, 0, 2\]"):
        SiteAggregates(count=60.0, site="s1", folds=(three.folds[1], three.folds[0],
                       three.folds[2]), feature_names=FEATURES,
                       feature_sums=three.feature_sums,
                       feature_sums_of_squares=three.feature_sums_of_squares)  # fmt: skip
    with pytest.raises(StatisticsMismatch, match="for 3 features in fold 0"):
        SiteAggregates(count=60.0, site="s1", feature_names=FEATURES,
                       feature_sums=three.feature_sums,
                       feature_sums_of_squares=three.feature_sums_of_squares,
                       folds=(FoldAggregates(0, 40.0, (1.0,), (1.0,)),))  # fmt: skip
    with pytest.raises(StatisticsMismatch, match="non-finite"):
        SiteAggregates(count=60.0, site="s1", feature_names=FEATURES,
                       feature_sums=three.feature_sums,
                       feature_sums_of_squares=three.feature_sums_of_squares,
                       folds=(FoldAggregates(0, math.nan, (1.0,) * 3, (1.0,) * 3),))  # fmt: skip


# ---- the run plan: folds for cross-validation runs, the global one for the final run ------------


def _plan(cross_validation: dict[str, int] | None) -> dict[str, object]:
    document: dict[str, object] = {
        "name": "cv", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "sites": ["a", "b"], "options": {"model": "logistic"},
        "defaults": {"steps": 5, "batch_size": 8, "learning_rate": 0.1},
    }  # fmt: skip
    if cross_validation is not None:
        document["cross_validation"] = cross_validation
    return document


class _View:
    """A done per-fold statistics request as the admin API shows it."""

    def __init__(self, combined: CombinedStatistics) -> None:
        self.status, self.dataset, self.task_type = "done", "heart", "tabular"
        self.feature_names, self.mean, self.std = FEATURES, combined.mean, combined.std
        self.folds = combined.folds


def test_cross_validation_plans_get_the_fold_normalisers_and_final_plans_the_global_one() -> None:
    sites = [_site(seed, 80, 3) for seed in range(2)]
    combined = combine(
        [_aggregates(f"s{i}", rows, ids, 3) for i, (rows, ids) in enumerate(sites)], cv_folds=3
    )
    statistics = _View(combined)

    cv = plan_with_normaliser(parse_plan(_plan({"folds": 3})), statistics)
    assert cv.options[FOLD_NORMALISERS_OPTION] == [
        {"mean": list(f.mean), "std": list(f.std)} for f in combined.folds
    ]
    assert cv.options["mean"] == list(combined.mean)  # the global one stays, for final runs
    # The fold normalisers are part of what the sites approve.
    without = parse_plan({**_plan({"folds": 3}), "options": {
        k: v for k, v in cv.options.items() if k != FOLD_NORMALISERS_OPTION}})  # fmt: skip
    assert cv.approval_bundle().sha256 != without.approval_bundle().sha256

    final = plan_with_normaliser(parse_plan(_plan(None)), statistics)
    assert FOLD_NORMALISERS_OPTION not in final.options
    with pytest.raises(ValueError, match="normalisers for 3 folds; the plan cross-validates "
                       "over 5 \\(collect with --cv-folds 5\\)"):  # fmt: skip
        plan_with_normaliser(parse_plan(_plan({"folds": 5})), statistics)
    with pytest.raises(ValueError, match="already set fold_normalisers"):
        plan_with_normaliser(cv, statistics)
    with pytest.raises(PlanError, match="applies to cross-validation runs"):
        parse_plan({**_plan(None), "options": dict(cv.options)})
    with pytest.raises(PlanError, match="one normaliser per fold \\(5\\)"):
        parse_plan({**_plan({"folds": 5}), "options": dict(cv.options)})
    with pytest.raises(PlanError, match="needs normalisation 'global'"):
        parse_plan({**_plan({"folds": 3}), "options": {
            FOLD_NORMALISERS_OPTION: cv.options[FOLD_NORMALISERS_OPTION]}})  # fmt: skip

    # A study's trials cross-validate with the folds' normalisers; its final run has none.
    template = RunTemplate(
        dataset="heart", labels=("0", "1"), task="tabular", metric="accuracy",
        options=dict(cv.options), cross_validation={"folds": 3, "min_validation_rows": 0},
    )  # fmt: skip
    candidate = CandidatePlan.build(
        [("a", "b")], HopHyperparameters(learning_rate=0.1, steps=5, batch_size=8)
    )
    trial = template.run_plan(candidate)
    assert trial.options[FOLD_NORMALISERS_OPTION] == cv.options[FOLD_NORMALISERS_OPTION]
    last = template.run_plan(candidate, final=True)
    assert last.cross_validation is None and FOLD_NORMALISERS_OPTION not in last.options
    assert last.options["mean"] == list(combined.mean)
    assert fold_normaliser_options(_View(combine([_aggregates("s", *sites[0], 0)]))) == {}


# ---- the round over gRPC, recorded in the ledger ------------------------------------------------


def test_a_per_fold_request_pools_and_records_each_folds_normaliser(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    ledger = coordinator.engine.ledger
    requested = request_heart_statistics(admin, cv_folds=3)
    bundle = ApprovalBundle.for_statistics("tabular", "heart", min_count=10, noise_std=0.0,
                                           cv_folds=3)  # fmt: skip
    assert requested.cv_folds == 3 and requested.approval_bundle_sha256 == bundle.sha256
    assert bundle.sha256 != ApprovalBundle.for_statistics(
        "tabular", "heart", min_count=10, noise_std=0.0).sha256  # fmt: skip

    data = {"site-a": _site(0, 90, 3), "site-b": _site(1, 60, 3)}
    for name, site in sites.items():
        task = _next_statistics(site)
        assert task.cv_folds == 3 and task.approval_bundle_json == bundle.canonical_json()
        released = _aggregates(name, *data[name], 3)
        assert site.stub.ReportStatistics(_result(task, released), timeout=WAIT).status == "done"

    status = admin.wait_for_statistics(requested.statistics_id, timeout=WAIT)
    assert status.status == "done", status.error
    assert [f.fold for f in status.folds] == [0, 1, 2]
    for fold in status.folds:
        training = np.concatenate([rows[ids != fold.fold] for rows, ids in data.values()])
        assert fold.count == len(training)
        np.testing.assert_allclose(fold.mean, training.mean(axis=0), rtol=0, atol=1e-9)
        np.testing.assert_allclose(fold.std, training.std(axis=0, ddof=1), rtol=0, atol=1e-9)

    row = _request(ledger, requested.statistics_id)
    assert row.cv_folds == 3 and [f["fold"] for f in row.combined["folds"]] == [0, 1, 2]
    assert row.combined["folds"][1]["mean"] == list(status.folds[1].mean)
    for answer in row.answers:
        assert [f["count"] for f in answer.aggregates["folds"]] == [
            float((data[answer.site][1] != k).sum()) for k in range(3)]  # fmt: skip
    events = [e for e in ledger.events()
              if e.payload.get("statistics_id") == requested.statistics_id]  # fmt: skip
    assert events[0].kind == "statistics.requested" and events[0].payload["cv_folds"] == 3
    assert [len(e.payload["aggregates"]["folds"]) for e in events[1:3]] == [3, 3]
    assert events[-1].kind == "statistics.done"
    assert events[-1].payload["combined"]["folds"] == row.combined["folds"]
    assert ledger.verify_chain() is None and ledger.verify().ok

    # The fold count is a snapshotted column: editing it in the table is caught.
    with ledger.engine.begin() as connection:
        connection.execute(text("UPDATE statistics_requests SET cv_folds = 5 WHERE id = :id"),
                           {"id": requested.statistics_id})  # fmt: skip
    [mismatch] = ledger.verify().row_mismatches
    assert (mismatch.table, mismatch.column) == ("statistics_requests", "cv_folds")


def test_per_fold_answers_without_folds_or_over_small_folds_are_refused(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    requested = request_heart_statistics(admin, cv_folds=3)
    tasks = {name: _next_statistics(site) for name, site in sites.items()}
    rows, ids = _site(2, 60, 3)

    def refused(result: pb.StatisticsResult) -> str:
        with pytest.raises(grpc.RpcError) as error:
            sites["site-a"].stub.ReportStatistics(result, timeout=WAIT)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return error.value.details() or ""

    # An answer without folds (an agent that predates them) is never stored.
    old = _result(tasks["site-a"], _aggregates("site-a", rows, ids, 3))
    del old.folds[:]
    assert "site-a released 0 folds; the request asked for 3 (an agent that predates per-fold " \
        "statistics answers without folds: upgrade it)" in refused(old)  # fmt: skip
    # 28 rows: folds 1 and 2 hold 9 rows each, below the minimum of 10.
    small_ids = np.arange(28) % 3
    small = refused(_result(tasks["site-a"], _aggregates("site-a", rows[:28], small_ids, 3)))
    assert "site-a released fold 1 over 19 training rows and 9 held-out rows; both must reach " \
        "the request's minimum of 10" in small  # fmt: skip
    assert admin.statistics(requested.statistics_id).status == "pending"

    # An older site refuses the bundle it does not know; the request says what to do.
    refusal = pb.StatisticsResult(
        statistics_id=requested.statistics_id, lease_token=tasks["site-b"].lease_token, ok=False,
        error_code="not-approved", error_message="the statistics request differs from its bundle",
    )  # fmt: skip
    assert sites["site-b"].stub.ReportStatistics(refusal, timeout=WAIT).status == "failed"
    failed = admin.statistics(requested.statistics_id)
    assert failed.status == "failed" and not failed.folds
    assert failed.error == (
        "site-b: not-approved: the statistics request differs from its bundle (a per-fold "
        "request: a site agent that predates per-fold statistics refuses it this way; upgrade "
        "that site, or collect without --cv-folds)"
    )
    assert coordinator.engine.ledger.verify_chain() is None


def test_bad_per_fold_requests_are_refused(
    sites: dict[str, ScriptedSite], admin: AdminClient
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=WAIT)
    for task_type, folds, message in [
        ("tabular", 1, "cv_folds must be 0 or in [2, 20], got 1"),
        ("tabular", 21, "cv_folds must be 0 or in [2, 20], got 21"),
        ("seq-classification", 3, "per-fold statistics (cv_folds) are for tabular datasets, "
                                   "not seq-classification"),
    ]:  # fmt: skip
        with pytest.raises(grpc.RpcError) as error:
            admin.collect_statistics("heart", task_type, ["site-a"], cv_folds=folds)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in (error.value.details() or "")


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_collects_shows_and_bundles_a_cross_validation_run_with_fold_normalisers(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator, pki: Pki,
    tmp_path: Path,
) -> None:  # fmt: skip
    admin.wait_for_sites({"site-a", "site-b"}, timeout=WAIT)
    connection = admin_options(coordinator.port, pki.tls("admin"))
    bundle = runner.invoke(app, ["statistics", "bundle", "heart", "--cv-folds", "3"])
    expected = ApprovalBundle.for_statistics("tabular", "heart", min_count=10, noise_std=0.0,
                                             cv_folds=3)  # fmt: skip
    assert bundle.exit_code == 0 and '"cv_folds": 3' in bundle.output
    assert f"baton-site approve {expected.sha256}" in bundle.output.replace("\n", "")

    def collect(*extra: str) -> str:
        collected = runner.invoke(app, ["statistics", "collect", "heart", "--site", "site-a",
                                        "--site", "site-b", *extra, *connection])  # fmt: skip
        assert collected.exit_code == 0, collected.output
        data = {"site-a": _site(5, 70, 3), "site-b": _site(6, 50, 3)}
        for name, site in sites.items():
            task = _next_statistics(site)
            released = _aggregates(name, *data[name], task.cv_folds)
            site.stub.ReportStatistics(_result(task, released), timeout=WAIT)
        return task.statistics_id

    per_fold = collect("--cv-folds", "3")
    shown = runner.invoke(app, ["statistics", "show", per_fold, "--json", *connection])
    document = json.loads(shown.output)
    assert document["cv_folds"] == 3 and [f["fold"] for f in document["folds"]] == [0, 1, 2]
    assert document["fold_normaliser_options"][FOLD_NORMALISERS_OPTION][2] == {
        "mean": document["folds"][2]["mean"], "std": document["folds"][2]["std"]}  # fmt: skip
    table = runner.invoke(app, ["statistics", "show", per_fold, *connection])
    text = " ".join(table.output.split())
    assert table.exit_code == 0 and "3 folds" in text
    assert f"fold 1 normaliser ({document['folds'][1]['count']:g} rows outside fold 1)" in text

    plan_file = tmp_path / "cv.json"
    plan_file.write_text(json.dumps(_plan({"folds": 3})))
    bundled = runner.invoke(app, ["run", "bundle", str(plan_file), "--normaliser", per_fold,
                                  *connection])  # fmt: skip
    assert bundled.exit_code == 0, bundled.output
    assert "and one per cross-validation fold (3 folds)" in " ".join(bundled.output.split())

    # Statistics without folds still normalise a cross-validation plan, with a note.
    global_only = collect()
    noted = runner.invoke(app, ["run", "bundle", str(plan_file), "--normaliser", global_only,
                                *connection])  # fmt: skip
    assert noted.exit_code == 0, noted.output
    assert (
        "note: the fold models use the global normaliser, fitted on their held-out rows "
        "too; collect with --cv-folds 3 for per-fold ones" in " ".join(noted.output.split())
    )
