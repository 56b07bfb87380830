"""Aggregate statistics at the coordinator: pooling, the ledger's record and the RPC refusals."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app
from coordinator.engine.ledger_writer import LedgerWriter
from coordinator.engine.sessions import SiteSessions
from coordinator.engine.statistics_rounds import StatisticsRounds
from coordinator.ledger import Ledger, StatisticsAnswerRow
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from coordinator.statistics import (
    CombinedStatistics,
    SiteAggregates,
    StatisticsMismatch,
    combine,
    normaliser_options,
    plan_with_normaliser,
)
from protocols.approval import ApprovalBundle
from protocols.v1 import baton_pb2 as pb
from tests.conftest import Pki, admin_options
from tests.coordinator_tests.conftest import (
    WAIT,
    EngineClock,
    ScriptedSite,
    committing_threads,
    request_heart_statistics,
)
from tests.coordinator_tests.conftest import next_statistics_task as _next_statistics
from tests.coordinator_tests.conftest import statistics_request as _request
from tests.coordinator_tests.conftest import statistics_result as _result

FEATURES = ("age", "chol", "bp")
runner = CliRunner()


def _aggregates(site: str, rows: np.ndarray, labels: list[str] | None = None) -> SiteAggregates:
    labels = labels or []
    return SiteAggregates(
        site=site,
        count=float(len(rows)),
        feature_names=FEATURES[: rows.shape[1]],
        feature_sums=tuple(rows.sum(axis=0)),
        feature_sums_of_squares=tuple((rows**2).sum(axis=0)),
        label_counts={label: float(labels.count(label)) for label in set(labels)},
    )


def _site_rows(seed: int) -> list[np.ndarray]:
    """Uneven sites with shifted, differently spread features."""
    rng = np.random.default_rng(seed)
    return [
        rng.normal([55 + 10 * i, 230 - 20 * i, 1000.0], [8 + i, 40, 0.5 + i], size=(n, 3))
        for i, n in enumerate(rng.integers(11, 400, size=int(rng.integers(2, 7))))
    ]


# ---- pooling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_global_normaliser_equals_the_pooled_mean_and_std(seed: int) -> None:
    import torch

    sites = _site_rows(seed)
    combined = combine([_aggregates(f"s{i}", rows) for i, rows in enumerate(sites)])

    pooled = np.concatenate(sites)
    assert combined.count == len(pooled)
    np.testing.assert_allclose(combined.mean, pooled.mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(combined.std, pooled.std(axis=0, ddof=1), rtol=0, atol=1e-6)
    # The tabular task's per-site normaliser uses torch's (unbiased) std: the same definition.
    reference = torch.tensor(pooled, dtype=torch.float64).std(dim=0).numpy()
    np.testing.assert_allclose(combined.std, reference, rtol=0, atol=1e-6)
    assert normaliser_options(combined) == {
        "normalisation": "global",
        "mean": list(combined.mean),
        "std": list(combined.std),
    }


def test_label_counts_and_histograms_are_summed_across_sites() -> None:
    a = SiteAggregates(site="a", count=12, label_counts={"x": 5, "y": 7},
                       length_bin_edges=(0, 8, 16), length_histogram=(2, 4, 6),
                       length_unit="words")  # fmt: skip
    b = SiteAggregates(site="b", count=10, label_counts={"y": 4, "z": 6},
                       length_bin_edges=(0, 8, 16), length_histogram=(1, 1, 8),
                       length_unit="words")  # fmt: skip
    combined = combine([a, b])
    assert combined.count == 22
    assert dict(combined.label_counts) == {"x": 5, "y": 11, "z": 6}
    assert combined.length_histogram == (3, 5, 14)
    assert combined.mean == () and combined.std == ()
    assert CombinedStatistics.from_json(json.loads(json.dumps(combined.to_json()))) == combined


def test_noise_that_pushes_the_variance_below_zero_is_clipped() -> None:
    noisy = SiteAggregates(site="a", count=20, feature_names=("x",), feature_sums=(20.0,),
                           feature_sums_of_squares=(19.0,))  # fmt: skip
    assert combine([noisy]).std == (0.0,)


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"feature_names": ("age", "cholesterol", "bp")}, "different feature names"),
        ({"length_bin_edges": (4, 10, 20), "length_histogram": (1, 1, 1)}, "first length bin"),
        ({"length_unit": "tokens"}, "length unit"),
    ],
)
def test_sites_that_disagree_cannot_be_pooled(other: dict[str, object], message: str) -> None:
    rows = _site_rows(0)
    base = _aggregates("a", rows[0])
    fields = {**base.to_json(), "site": "b", "length_bin_edges": (0, 8, 16),
              "length_histogram": (1, 2, 3), "length_unit": "words"}  # fmt: skip
    first = SiteAggregates.from_json(fields | {"site": "a"})
    with pytest.raises(StatisticsMismatch, match=message):
        combine([first, SiteAggregates.from_json(fields | other)])


def test_malformed_or_too_small_aggregates_are_refused() -> None:
    with pytest.raises(StatisticsMismatch, match="non-finite"):
        SiteAggregates(site="a", count=float("nan"))
    with pytest.raises(StatisticsMismatch, match="2 sums and 1 sums of squares for 2 features"):
        SiteAggregates(site="a", count=3, feature_names=("x", "y"), feature_sums=(1, 2),
                       feature_sums_of_squares=(1,))  # fmt: skip
    one = SiteAggregates(site="a", count=1, feature_names=("x",), feature_sums=(1.0,),
                         feature_sums_of_squares=(1.0,))  # fmt: skip
    with pytest.raises(StatisticsMismatch, match="too small"):
        combine([one])
    with pytest.raises(StatisticsMismatch, match="no site"):
        combine([])


class _View:
    """What `baton run start --normaliser` reads from the coordinator (StatisticsStatus)."""

    def __init__(self, **fields: object) -> None:
        defaults = {"status": "done", "dataset": "heart", "task_type": "tabular",
                    "feature_names": ["age"], "mean": [50.0], "std": [9.0]}  # fmt: skip
        self.__dict__.update(defaults | fields)


def test_plan_with_normaliser_puts_mean_and_std_into_the_approved_bundle() -> None:
    plan = parse_plan({"task": "tabular", "dataset": "heart", "labels": ["0", "1"],
                       "sites": ["a"], "options": {"model": "mlp"}})  # fmt: skip
    normalised = plan_with_normaliser(plan, _View())
    assert normalised.options == {"model": "mlp", "normalisation": "global", "mean": [50.0],
                                  "std": [9.0]}  # fmt: skip
    assert normalised.approval_bundle().options["mean"] == [50.0]
    assert normalised.approval_bundle().sha256 != plan.approval_bundle().sha256
    for view, message in [
        (_View(status="pending"), "pending, not done"),
        (_View(dataset="other"), "dataset 'other'"),
        (_View(feature_names=[], mean=[], std=[]), "no per-feature mean"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan_with_normaliser(plan, view)
    per_site = parse_plan({"task": "tabular", "dataset": "heart", "labels": ["0", "1"],
                           "sites": ["a"], "options": {"normalisation": "per-site"}})  # fmt: skip
    with pytest.raises(ValueError, match="already set normalisation 'per-site'"):
        plan_with_normaliser(per_site, _View())
    text = parse_plan({"dataset": "heart", "labels": ["0", "1"], "sites": ["a"]})
    with pytest.raises(ValueError, match="tabular runs"):
        plan_with_normaliser(text, _View())


# ---- the round over gRPC, recorded in the ledger ------------------------------------------------


def _answer(ledger: Ledger, statistics_id: str, site: str) -> StatisticsAnswerRow:
    return next(a for a in _request(ledger, statistics_id).answers if a.site == site)


def _kinds(ledger: Ledger, statistics_id: str) -> list[tuple[str, str | None]]:
    return [
        (e.kind, e.site)
        for e in ledger.events()
        if e.kind.startswith("statistics.") and e.payload.get("statistics_id") == statistics_id
    ]


def test_sites_report_aggregates_and_the_ledger_records_the_pooled_normaliser(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    ledger = coordinator.engine.ledger
    committed_on = committing_threads(ledger)
    requested = request_heart_statistics(admin)
    assert requested.status == "pending" and requested.min_count == 10  # the default
    bundle = ApprovalBundle.for_statistics("tabular", "heart", min_count=10, noise_std=0.0)
    assert requested.approval_bundle_sha256 == bundle.sha256

    rows = _site_rows(7)[:2]
    labels = [["0", "1", "1"] * 100, ["1", "0"] * 200]
    tasks = {name: _next_statistics(site) for name, site in sites.items()}
    for task in tasks.values():
        assert (task.statistics_id, task.dataset, task.task_type, task.min_count) == (
            requested.statistics_id, "heart", "tabular", 10)  # fmt: skip
        assert task.approval_bundle_json == bundle.canonical_json()
    assert tasks["site-a"].lease_token != tasks["site-b"].lease_token

    for index, name in enumerate(("site-a", "site-b")):
        aggregates = _aggregates(name, rows[index], labels[index][: len(rows[index])])
        answer = sites[name].stub.ReportStatistics(_result(tasks[name], aggregates), timeout=30)
        assert answer.status == "done"

    status = admin.wait_for_statistics(requested.statistics_id, timeout=30)
    pooled = np.concatenate(rows)
    assert status.status == "done" and status.count == len(pooled)
    assert list(status.feature_names) == list(FEATURES)
    np.testing.assert_allclose(status.mean, pooled.mean(axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(status.std, pooled.std(axis=0, ddof=1), rtol=0, atol=1e-6)
    assert [(s.site, s.status, s.count) for s in status.sites] == [
        ("site-a", "done", len(rows[0])), ("site-b", "done", len(rows[1]))]  # fmt: skip
    assert sum(status.label_counts.values()) == len(pooled)

    row = _request(ledger, requested.statistics_id)
    assert (row.status, row.dataset, row.sites, row.error) == (
        "done", "heart", ["site-a", "site-b"], None)  # fmt: skip
    assert row.finished_at is not None and row.combined["mean"] == list(status.mean)
    for answer_row, site_rows in zip(row.answers, rows, strict=True):
        assert answer_row.status == "done" and answer_row.lease_token is None
        assert answer_row.aggregates["feature_sums"] == list(site_rows.sum(axis=0))
    assert _kinds(ledger, requested.statistics_id) == [
        ("statistics.requested", None), ("statistics.site-done", "site-a"),
        ("statistics.site-done", "site-b"), ("statistics.done", None)]  # fmt: skip
    assert ledger.verify_chain() is None
    kinds = ("statistics.requested", "statistics.site-done", "statistics.done")
    assert {k: committed_on.get(k) for k in kinds} == {k: {"ledger-writer_0"} for k in kinds}

    # A replayed answer is fenced and recorded like any refusal; nothing changes.
    with pytest.raises(grpc.RpcError) as replay:
        sites["site-a"].stub.ReportStatistics(
            _result(tasks["site-a"], _aggregates("site-a", rows[1])), timeout=30
        )
    assert replay.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    refusal = ledger.events()[-1]
    assert refusal.kind == "access.refused" and refusal.payload["method"] == "ReportStatistics"
    assert _request(ledger, requested.statistics_id).combined == row.combined
    assert ledger.verify_chain() is None


def test_one_refusal_fails_the_request_and_keeps_the_other_answers(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    ledger = coordinator.engine.ledger
    requested = request_heart_statistics(admin, min_count=30)
    tasks = {name: _next_statistics(site) for name, site in sites.items()}
    assert tasks["site-a"].min_count == 30

    refusal = pb.StatisticsResult(
        statistics_id=requested.statistics_id, lease_token=tasks["site-a"].lease_token, ok=False,
        error_code="below-minimum-count", error_message="12 training rows, fewer than the 30",
        count=12.0, feature_sums=[1.0, 2.0, 3.0],  # ignored: a refusal releases nothing
    )  # fmt: skip
    assert sites["site-a"].stub.ReportStatistics(refusal, timeout=30).status == "failed"
    failed = admin.statistics(requested.statistics_id)
    assert failed.status == "failed" and "site-a: below-minimum-count" in failed.error
    assert not failed.mean

    # site-b was already at work: its answer is still recorded; the request stays failed.
    rows = _site_rows(3)[0]
    sites["site-b"].stub.ReportStatistics(
        _result(tasks["site-b"], _aggregates("site-b", rows)), timeout=30
    )
    status = admin.statistics(requested.statistics_id)
    assert status.status == "failed"
    assert [(s.site, s.status) for s in status.sites] == [("site-a", "failed"),
                                                          ("site-b", "done")]  # fmt: skip
    assert status.sites[0].error.startswith("below-minimum-count")
    refused = _answer(ledger, requested.statistics_id, "site-a")
    assert refused.aggregates == {} and refused.error_code == "below-minimum-count"
    assert _answer(ledger, requested.statistics_id, "site-b").aggregates["count"] == len(rows)
    assert _kinds(ledger, requested.statistics_id) == [
        ("statistics.requested", None), ("statistics.site-failed", "site-a"),
        ("statistics.failed", None), ("statistics.site-done", "site-b")]  # fmt: skip
    assert ledger.verify_chain() is None


def test_answers_are_refused_from_other_sites_with_stale_tokens_or_too_few_rows(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    requested = request_heart_statistics(admin, ("site-a",), min_count=50)
    task = _next_statistics(sites["site-a"])
    rows = _site_rows(1)[0]

    def refused(site: str, result: pb.StatisticsResult) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as error:
            sites[site].stub.ReportStatistics(result, timeout=30)
        return error.value.code()

    good = _result(task, _aggregates("site-a", rows[:60]))
    assert refused("site-b", good) == grpc.StatusCode.PERMISSION_DENIED
    stale = pb.StatisticsResult()
    stale.CopyFrom(good)
    stale.lease_token = "0" * 32
    assert refused("site-a", stale) == grpc.StatusCode.FAILED_PRECONDITION
    unknown = pb.StatisticsResult()
    unknown.CopyFrom(good)
    unknown.statistics_id = "f" * 32
    assert refused("site-a", unknown) == grpc.StatusCode.NOT_FOUND
    # Without noise a site's count is exact: fewer rows than the minimum is never stored.
    assert refused("site-a", _result(task, _aggregates("site-a", rows[:20]))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    not_finite = _result(task, _aggregates("site-a", rows[:60]))
    not_finite.feature_sums[0] = float("inf")
    assert refused("site-a", not_finite) == grpc.StatusCode.INVALID_ARGUMENT
    # Nor a cell below the minimum (sites suppress them; an agent that does not is refused).
    small_cell = _result(task, _aggregates("site-a", rows[:60], ["0"] * 55 + ["1"] * 5))
    with pytest.raises(grpc.RpcError) as cell:
        sites["site-a"].stub.ReportStatistics(small_cell, timeout=30)
    assert cell.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cells below the request's minimum of 50: label '1'" in cell.value.details()
    methods = [e.payload.get("method") for e in coordinator.engine.ledger.events()
               if e.kind == "access.refused"]  # fmt: skip
    assert methods.count("ReportStatistics") == 6
    assert admin.statistics(requested.statistics_id).status == "pending"
    assert sites["site-a"].stub.ReportStatistics(good, timeout=30).status == "done"
    assert admin.statistics(requested.statistics_id).status == "done"


def test_bad_requests_are_refused(
    sites: dict[str, ScriptedSite], admin: AdminClient, pki: Pki, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    for args, kwargs, message in [
        (("heart", "tabular", []), {}, "at least one site"),
        (("heart", "tabular", ["nowhere"]), {}, "no site named nowhere"),
        (("heart", "images", ["site-a"]), {}, "task type must be one of"),
        (("heart", "tabular", ["site-a"]), {"noise_std": -1.0}, "noise_std"),
    ]:
        with pytest.raises(grpc.RpcError) as error:
            admin.collect_statistics(*args, **kwargs)  # type: ignore[arg-type]
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in error.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        admin.statistics("nope")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    # Only admins ask for statistics.
    site_as_admin = AdminClient(f"localhost:{coordinator.port}", pki.tls("site-a"))
    with pytest.raises(grpc.RpcError) as denied:
        site_as_admin.collect_statistics("heart", "tabular", ["site-a"])
    site_as_admin.close()
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_site_that_connects_later_gets_its_pending_statistics_task(
    pki: Pki, sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    late = ScriptedSite(pki, "site-c", coordinator.port)
    late.hello()  # known to the coordinator, but no task stream open
    requested = request_heart_statistics(admin, ("site-a", "site-c"))
    _next_statistics(sites["site-a"])
    try:
        late.connect()
        task = _next_statistics(late)
        assert task.statistics_id == requested.statistics_id
    finally:
        late.close()
    # A reconnect gets the same task again, with the same lease token.
    again = ScriptedSite(pki, "site-c", coordinator.port)
    try:
        again.connect()
        resent = _next_statistics(again)
        assert resent.lease_token == task.lease_token
    finally:
        again.close()


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_collects_shows_and_starts_a_run_with_the_normaliser(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    coordinator: Coordinator,
    pki: Pki,
    tmp_path: Path,
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=WAIT)
    connection = admin_options(coordinator.port, pki.tls("admin"))
    bundle = runner.invoke(app, ["statistics", "bundle", "heart", "--min-count", "12"])
    expected = ApprovalBundle.for_statistics("tabular", "heart", min_count=12, noise_std=0.0)
    assert f"baton-site approve {expected.sha256}" in bundle.output.replace("\n", "")

    collected = runner.invoke(app, ["statistics", "collect", "heart", "--site", "site-a", "--site",
                                    "site-b", "--min-count", "12", *connection])  # fmt: skip
    assert collected.exit_code == 0, collected.output
    assert expected.sha256 in collected.output.replace("\n", "")
    rows = _site_rows(11)[:2]
    for name, site_rows in zip(("site-a", "site-b"), rows, strict=True):
        task = _next_statistics(sites[name])
        sites[name].stub.ReportStatistics(_result(task, _aggregates(name, site_rows)), timeout=30)
    statistics_id = task.statistics_id

    shown = runner.invoke(app, ["statistics", "show", statistics_id, "--json", *connection])
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.output)
    assert document["status"] == "done" and document["min_count"] == 12
    pooled = np.concatenate(rows)
    np.testing.assert_allclose(document["mean"], pooled.mean(axis=0), rtol=0, atol=1e-6)
    assert document["normaliser_options"]["std"] == document["std"]
    table = runner.invoke(app, ["statistics", "show", statistics_id, *connection])
    assert table.exit_code == 0 and "global normaliser" in table.output

    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"name": "normalised", "task": "tabular", "dataset": "heart",
                                     "labels": ["0", "1"], "sites": ["site-a"]}))  # fmt: skip
    started = runner.invoke(app, ["run", "start", str(plan_file), "--normaliser", statistics_id,
                                  *connection])  # fmt: skip
    assert started.exit_code == 0, started.output
    run_id = started.output.split("run started: ")[1].split()[0]
    run = coordinator.engine.ledger.run(run_id)
    assert run.plan["options"] == document["normaliser_options"]
    hop = _hop_task(sites["site-a"])
    assert json.loads(hop.approval_bundle_json)["options"]["mean"] == document["mean"]

    other = tmp_path / "other.json"
    other.write_text(json.dumps({"task": "tabular", "dataset": "lungs", "labels": ["0", "1"],
                                 "sites": ["site-a"]}))  # fmt: skip
    refused = runner.invoke(app, ["run", "start", str(other), "--normaliser", statistics_id,
                                  *connection])  # fmt: skip
    assert refused.exit_code == 2 and "'lungs'" in refused.output


def _hop_task(site: ScriptedSite) -> pb.HopTask:
    task = site.tasks.get(timeout=WAIT)
    assert task.WhichOneof("kind") == "hop", task
    return task.hop


# ---- suppressed cells and expiry ----------------------------------------------------------------


def test_merged_histograms_and_suppressed_labels_pool_over_what_was_released() -> None:
    a = SiteAggregates(site="a", count=48, label_counts={"x": 30, "<suppressed>": 18},
                       length_bin_edges=(0, 8, 16, 32), length_histogram=(12, 11, 10, 15),
                       length_unit="words")  # fmt: skip
    b = SiteAggregates(site="b", count=50, label_counts={"x": 25, "y": 12, "<suppressed>": 13},
                       length_bin_edges=(0, 16), length_histogram=(20, 30),
                       length_unit="words")  # fmt: skip
    combined = combine([a, b])
    # site b merged [0, 16): the pooled histogram has the bins both sites' bins fit in.
    assert combined.length_bin_edges == (0, 16)
    assert combined.length_histogram == (12 + 11 + 20, 10 + 15 + 30)
    # "y" is a lower bound (site a suppressed it); what was suppressed is summed apart.
    assert dict(combined.label_counts) == {"x": 55, "y": 12, "<suppressed>": 31}
    assert sum(combined.label_counts.values()) == sum(combined.length_histogram) == 98
    with pytest.raises(StatisticsMismatch, match="do not increase"):
        SiteAggregates(site="c", count=20, length_bin_edges=(0, 16, 8),
                       length_histogram=(10, 5, 5))  # fmt: skip


def test_a_pending_request_expires_is_ledgered_and_refuses_late_answers(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator,
    engine_clock: EngineClock,
) -> None:  # fmt: skip
    ledger = coordinator.engine.ledger
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    with pytest.raises(grpc.RpcError) as bad:
        admin.collect_statistics("heart", "tabular", ["site-a"], expires_in_seconds=0.5)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "expires in 1 s to" in bad.value.details()
    default = admin.collect_statistics("heart", "tabular", ["site-a"])
    assert 3590 < default.expires_at - time.time() < 3610  # statistics_expiry_seconds
    for name in ("site-a",):
        _next_statistics(sites[name])

    requested = admin.collect_statistics("heart", "tabular", ["site-a", "site-b"],
                                         expires_in_seconds=60)  # fmt: skip
    tasks = {name: _next_statistics(site) for name, site in sites.items()}
    assert all(t.expires_at == requested.expires_at > 0 for t in tasks.values())
    rows = _site_rows(5)[:2]
    on_time = _result(tasks["site-a"], _aggregates("site-a", rows[0]))
    assert sites["site-a"].stub.ReportStatistics(on_time, timeout=30).status == "done"

    engine_clock.advance(61)  # site-b never answers in time
    expired = admin.wait_for_statistics(requested.statistics_id, timeout=30)
    assert expired.status == "failed"
    assert expired.error.startswith("expired at ") and "before site-b answered" in expired.error
    assert _kinds(ledger, requested.statistics_id) == [
        ("statistics.requested", None), ("statistics.site-done", "site-a"),
        ("statistics.expired", None)]  # fmt: skip

    late = _result(tasks["site-b"], _aggregates("site-b", rows[1]))
    with pytest.raises(grpc.RpcError) as refused:
        sites["site-b"].stub.ReportStatistics(late, timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired at" in refused.value.details() and "too late" in refused.value.details()
    assert ledger.events()[-1].kind == "access.refused"
    assert _answer(ledger, requested.statistics_id, "site-b").status == "pending"
    assert _answer(ledger, requested.statistics_id, "site-b").aggregates == {}
    assert ledger.verify_chain() is None


def test_cli_collect_expires_in_fails_a_request_no_site_answers(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator, pki: Pki
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=WAIT)
    connection = admin_options(coordinator.port, pki.tls("admin"))
    collected = runner.invoke(app, ["statistics", "collect", "heart", "--site", "site-a",
                                    "--expires-in", "1", "--wait", "30", *connection])  # fmt: skip
    assert collected.exit_code == 1, collected.output
    output = " ".join(collected.output.split())
    assert "expires 20" in output and "expired at" in output and "before site-a answered" in output
    statistics_id = collected.output.split("statistics requested: ")[1].split()[0]
    shown = runner.invoke(app, ["statistics", "show", statistics_id, "--json", *connection])
    document = json.loads(shown.output)
    assert document["status"] == "failed" and document["expires_at"] > 0


def test_a_watchdog_pass_with_no_pending_request_takes_neither_the_lock_nor_the_writer(
    ledger: Ledger,
) -> None:
    """The expiry pass every half second reads one id, not every pending request as rows on
    the ledger writer's thread under the engine's lock (which a hand back's commit waits for)."""
    handed: list[object] = []

    class Writer(LedgerWriter):
        async def run(self, write: Any, *args: Any, **kwargs: Any) -> Any:
            handed.append(write)
            return await super().run(write, *args, **kwargs)

    async def passes() -> bool:
        writer = Writer()
        try:
            lock = asyncio.Lock()
            rounds = StatisticsRounds(ledger, lock, SiteSessions(ledger), writer, min_count=10,
                                      expiry_seconds=3600.0)  # fmt: skip
            async with lock:  # held: a pass that wanted it would wait here for good
                await asyncio.wait_for(rounds.expire_statistics(), timeout=5)
            return ledger.has_pending_statistics()
        finally:
            writer.close()

    assert asyncio.run(passes()) is False
    assert handed == []
