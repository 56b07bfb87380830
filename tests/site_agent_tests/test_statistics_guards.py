"""The site's statistics guards: small cells, answer and privacy budgets, differencing, expiry."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest

from protocols.approval import ApprovalBundle
from protocols.v1 import baton_pb2 as pb
from site_agent.examples import TabularExample, TextExample
from site_agent.registry import RegisteredDataset
from site_agent.releases import (
    ReleaseLimits,
    ReleaseRefused,
    StatisticsReleases,
    answer_request,
    epsilon_of,
    gaussian_rho,
)
from site_agent.statistics import (
    LENGTH_BIN_EDGES,
    SUPPRESSED_LABEL,
    SiteAggregates,
    compute_statistics,
    l2_sensitivity,
    length_histogram,
    merge_small_bins,
    suppress_small_labels,
)
from tests.site_agent_tests.helpers import RecordingStub, statistics_agent


def _tabular(rows: list[TabularExample], name: str = "heart") -> RegisteredDataset:
    return RegisteredDataset(
        name=name, task_type="tabular", fingerprint="0" * 64, train=tuple(rows),
        validation=(), test=(), feature_names=("age", "chol"),
    )  # fmt: skip


def _rows(count: int, seed: int, labels: tuple[str, ...] = ("0", "1")) -> list[TabularExample]:
    rng = random.Random(seed)
    return [
        TabularExample(features=(rng.gauss(55, 8), rng.gauss(230, 40)), label=rng.choice(labels))
        for _ in range(count)
    ]


def _notes(count: int, name: str = "notes") -> RegisteredDataset:
    rows = tuple(TextExample(text="word " * (i % 50 + 1), label=str(i % 2)) for i in range(count))
    return RegisteredDataset(name=name, task_type="seq-classification", fingerprint="0" * 64,
                             train=rows, validation=(), test=())  # fmt: skip


# ---- small cells --------------------------------------------------------------------------------


def test_small_label_cells_are_suppressed_into_one_cell_that_reaches_the_minimum() -> None:
    # Two small labels that together reach the minimum: one <suppressed> cell of 11.
    assert suppress_small_labels({"a": 30.0, "b": 5.0, "c": 6.0}, 10) == {
        "a": 30.0, SUPPRESSED_LABEL: 11.0}  # fmt: skip
    # Together still small: the smallest released label joins them (else count - released
    # labels would give the 7 back).
    assert suppress_small_labels({"a": 50.0, "b": 12.0, "c": 3.0, "d": 4.0}, 10) == {
        "a": 50.0, SUPPRESSED_LABEL: 19.0}  # fmt: skip
    assert suppress_small_labels({"a": 10.0, "b": 12.0}, 10) == {"a": 10.0, "b": 12.0}
    # Every label together below the minimum: no label count at all.
    assert suppress_small_labels({"a": 3.0, "b": 4.0}, 10) == {}
    with pytest.raises(ValueError, match="marks suppressed labels"):
        suppress_small_labels({SUPPRESSED_LABEL: 20.0}, 10)


@pytest.mark.parametrize("seed", range(20))
def test_no_released_label_cell_nor_the_remainder_is_below_the_minimum(seed: int) -> None:
    rng = random.Random(seed)
    minimum = rng.randint(2, 15)
    counts = {f"l{i}": float(rng.choice([1, 2, 3, rng.randint(1, 40)])) for i in range(6)}
    total = sum(counts.values())

    released = suppress_small_labels(counts, minimum)

    assert all(n >= minimum for n in released.values())
    assert math.isclose(sum(released.values()), total) or not released
    # What the released count minus the named labels implies is the <suppressed> cell.
    named = sum(n for label, n in released.items() if label != SUPPRESSED_LABEL)
    assert total - named == 0 or total - named >= minimum or not released
    for label, n in released.items():
        assert label == SUPPRESSED_LABEL or n == counts[label]


def test_tabular_answers_suppress_a_rare_label() -> None:
    rows = _rows(40, seed=1, labels=("0", "1"))
    rare = [TabularExample(features=(60.0, 200.0), label="2") for _ in range(3)]
    exact = _tabular(rows + rare)

    aggregates = compute_statistics(exact, min_count=10)

    assert "2" not in aggregates.label_counts
    assert sum(aggregates.label_counts.values()) == aggregates.count == 43
    assert all(n >= 10 for n in aggregates.label_counts.values())
    assert SUPPRESSED_LABEL in aggregates.label_counts


def test_histogram_bins_are_merged_with_neighbours_until_each_reaches_the_minimum() -> None:
    edges = LENGTH_BIN_EDGES
    #        [0,8) [8,16) [16,32) [32,64) [64,128) [128,256) [256,512) [512,1024) [1024,)
    counts = (12.0, 3.0, 4.0, 5.0, 20.0, 0.0, 0.0, 1.0, 2.0)
    assert merge_small_bins(edges, counts, 10) == ((0, 8, 64), (12.0, 12.0, 23.0))
    # Already large bins are kept; the total never changes.
    assert merge_small_bins(edges[:3], (10.0, 11.0, 12.0), 10) == (edges[:3], (10.0, 11.0, 12.0))
    assert merge_small_bins(edges[:3], (1.0, 2.0, 3.0), 10) == ((0,), (6.0,))

    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(0, 3000, size=int(rng.integers(10, 200)))
        minimum = int(rng.integers(1, 30))
        raw = length_histogram(list(lengths))
        merged_edges, merged = merge_small_bins(LENGTH_BIN_EDGES, raw, minimum)
        assert math.isclose(sum(merged), sum(raw))
        assert all(n >= minimum for n in merged) or len(merged) == 1
        assert merged_edges[0] == 0 and set(merged_edges) <= set(LENGTH_BIN_EDGES)
        # Each merged bin is exactly the sum of the original bins it covers.
        for low, n in zip(merged_edges, merged, strict=True):
            high = next((e for e in merged_edges if e > low), math.inf)
            assert n == sum(c for e, c in zip(LENGTH_BIN_EDGES, raw, strict=True)
                            if low <= e < high)  # fmt: skip


def test_rows_answered_before_get_no_finer_histogram_than_before(tmp_path: Path) -> None:
    # 5 texts in each of the first six length bins.
    lengths = [n for low in (0, 8, 16, 32, 64, 128) for n in [low + 1] * 5]
    rows = tuple(TextExample(text="w " * n, label="x") for n in lengths)
    notes = RegisteredDataset(name="notes", task_type="seq-classification",
                              fingerprint="0" * 64, train=rows, validation=(), test=())  # fmt: skip
    releases = StatisticsReleases(tmp_path / "releases.json")
    first = answer_request(notes, releases, min_count=10)
    assert (first.length_bin_edges, first.length_histogram) == ((0, 16, 64), (10.0, 10.0, 10.0))
    # Alone, minimum 15 groups the same rows as [0, 32) and [32, inf): together with the first
    # answer that would give the 5 rows of [16, 32). Over the same rows only edges both
    # groupings share are released.
    raw = length_histogram(lengths)
    assert merge_small_bins(LENGTH_BIN_EDGES, raw, 15) == ((0, 32), (15.0, 15.0))
    second = answer_request(notes, releases, min_count=15)
    assert (second.length_bin_edges, second.length_histogram) == ((0,), (30.0,))
    # Other rows are grouped on their own.
    other = dataclasses.replace(notes, name="other", train=rows + rows)
    assert answer_request(other, releases, min_count=10).length_bin_edges == LENGTH_BIN_EDGES[:6]


# ---- answer budget ------------------------------------------------------------------------------


def test_a_site_answers_at_most_its_budget_of_requests_per_dataset(tmp_path: Path) -> None:
    releases = StatisticsReleases(tmp_path / "releases.json", ReleaseLimits(max_answers=2))
    heart, other = _tabular(_rows(40, seed=2)), _tabular(_rows(40, seed=3), name="other")
    for _ in range(2):
        assert answer_request(heart, releases, min_count=10).count == 40

    with pytest.raises(ReleaseRefused, match="answered 2 statistics requests") as refused:
        answer_request(heart, releases, min_count=10)
    assert refused.value.code == "statistics-budget-exhausted"
    # The budget is per dataset, and it survives a restart (a new record on the same file).
    assert answer_request(other, releases, min_count=10).count == 40
    reopened = StatisticsReleases(tmp_path / "releases.json", ReleaseLimits(max_answers=2))
    assert reopened.spent("heart") == (2, 0.0)
    with pytest.raises(ReleaseRefused):
        answer_request(heart, reopened, min_count=10)

    def never(previous_edges: object) -> tuple[SiteAggregates, float]:
        raise AssertionError("computed past the budget")

    with pytest.raises(ReleaseRefused):
        reopened.release("heart", heart.train, min_count=10, compute=never)
    assert reopened.spent("heart") == (2, 0.0)


def test_refusals_below_the_minimum_count_spend_no_budget(tmp_path: Path) -> None:
    from site_agent.statistics import BelowMinimumCount

    releases = StatisticsReleases(tmp_path / "releases.json", ReleaseLimits(max_answers=1))
    with pytest.raises(BelowMinimumCount):
        answer_request(_tabular(_rows(40, seed=4)), releases, min_count=50)
    assert releases.spent("heart") == (0, 0.0)
    assert answer_request(_tabular(_rows(40, seed=4)), releases, min_count=10).count == 40


# ---- differencing -------------------------------------------------------------------------------


def test_rows_that_differ_from_answered_ones_by_fewer_than_the_minimum_are_refused(
    tmp_path: Path,
) -> None:
    releases = StatisticsReleases(tmp_path / "releases.json")
    rows = _rows(60, seed=5)
    answer_request(_tabular(rows), releases, min_count=10)

    # Re-registered with 3 more rows: the two answers would give those rows' values.
    with pytest.raises(ReleaseRefused, match="differ by 3 rows") as refused:
        answer_request(_tabular(rows + _rows(3, seed=6)), releases, min_count=10)
    assert refused.value.code == "differencing-risk"
    # The same rows under another name, less 4 of them (a fold, a subset).
    with pytest.raises(ReleaseRefused, match="differ by 4 rows"):
        answer_request(_tabular(rows[4:], name="heart-subset"), releases, min_count=10)
    # A changed row counts twice (one row out, one in).
    changed = [*rows[:-1], TabularExample(features=(1.0, 2.0), label="0")]
    with pytest.raises(ReleaseRefused, match="differ by 2 rows"):
        answer_request(_tabular(changed), releases, min_count=10)
    # A request's larger minimum makes the threshold larger, for later requests too.
    with pytest.raises(ReleaseRefused, match="fewer than the minimum count 30"):
        answer_request(_tabular(rows + _rows(15, seed=7)), releases, min_count=30)

    # The same rows again give the same exact answer: allowed (the answer budget limits it).
    assert answer_request(_tabular(rows), releases, min_count=10).count == 60
    # Enough new rows: allowed, and recorded for later comparisons.
    grown = rows + _rows(15, seed=8)
    assert answer_request(_tabular(grown), releases, min_count=10).count == 75
    with pytest.raises(ReleaseRefused, match="differ by 1 rows"):
        answer_request(_tabular(grown + _rows(1, seed=9)), releases, min_count=10)
    assert releases.spent("heart") == (3, 0.0)
    # Row contents are never written: salted digests only.
    text = (tmp_path / "releases.json").read_text()
    assert f"{rows[0].features[0]!r}" not in text


# ---- privacy budget -----------------------------------------------------------------------------


def test_noised_answers_spend_a_zcdp_budget_and_are_refused_past_it(tmp_path: Path) -> None:
    limits = ReleaseLimits(max_answers=100, epsilon=1.0, delta=1e-6)
    releases = StatisticsReleases(tmp_path / "releases.json", limits)
    notes = _notes(40)
    exact = compute_statistics(notes, min_count=10)
    # Count, one label cell and one length bin each move by 1 with one row.
    assert l2_sensitivity(notes, exact) == pytest.approx(math.sqrt(3))
    rho = gaussian_rho(math.sqrt(3), 20.0)
    assert rho == pytest.approx(3 / 800)
    affordable = max(k for k in range(1, 100) if epsilon_of(k * rho, 1e-6) <= 1.0)
    assert 1 < affordable < 100

    answers = [answer_request(notes, releases, min_count=10, noise_std=20.0)
               for _ in range(affordable)]  # fmt: skip
    assert all(a.count != exact.count for a in answers)  # noised
    with pytest.raises(ReleaseRefused, match="beyond this site's budget of epsilon 1") as refused:
        answer_request(notes, releases, min_count=10, noise_std=20.0)
    assert refused.value.code == "privacy-budget-exhausted"
    answered, spent = releases.spent("notes")
    assert answered == affordable and spent == pytest.approx(affordable * rho)
    # Exact answers are not DP and spend no rho (the answer budget still counts them).
    answer_request(notes, releases, min_count=10)
    assert releases.spent("notes") == (affordable + 1, pytest.approx(affordable * rho))


def test_tabular_sensitivity_grows_with_the_largest_feature_value() -> None:
    rows = [TabularExample(features=(float(i % 7), -3.0), label="0") for i in range(20)]
    dataset = _tabular(rows)
    aggregates = compute_statistics(dataset, min_count=10)
    # count, one label, and per feature up to B in the sum and B^2 in the sum of squares; B = 6.
    assert l2_sensitivity(dataset, aggregates) == pytest.approx(math.sqrt(2 + 2 * (6**2 + 6**4)))


def test_zcdp_conversion_is_bun_and_steinkes() -> None:
    # rho-zCDP implies (rho + 2 sqrt(rho ln(1/delta)), delta)-DP (Bun & Steinke 2016, Prop. 1.3).
    assert epsilon_of(0.5, math.exp(-2)) == pytest.approx(0.5 + 2 * math.sqrt(0.5 * 2))
    assert epsilon_of(0.01, 1e-6) < epsilon_of(0.02, 1e-6) < epsilon_of(0.02, 1e-9)


# ---- the agent: expiry and reason codes ---------------------------------------------------------


def _task(expires_at: float) -> pb.StatisticsTask:
    bundle = ApprovalBundle.for_statistics("tabular", "heart", min_count=10, noise_std=0.0)
    return pb.StatisticsTask(
        statistics_id="s1", lease_token="t", task_type="tabular", dataset="heart", min_count=10,
        approval_bundle_json=bundle.canonical_json(), expires_at=int(expires_at),
    )  # fmt: skip


def test_the_site_refuses_an_expired_request_beyond_its_clock_skew_tolerance(
    tmp_path: Path,
) -> None:
    agent = statistics_agent(tmp_path, csv_seed=11, clock_skew_seconds=60)
    stub = RecordingStub()

    agent._run_statistics(stub, _task(time.time() - 3600))  # type: ignore[arg-type]
    agent._run_statistics(stub, _task(time.time() - 10))  # type: ignore[arg-type]  # within skew
    agent._run_statistics(stub, _task(time.time() + 3600))  # type: ignore[arg-type]

    expired, skewed, fresh = stub.results
    assert (expired.ok, expired.error_code) == (False, "statistics-expired")
    assert "expired at" in expired.error_message and "tolerance 60 s" in expired.error_message
    assert not expired.count and not expired.feature_sums
    assert skewed.ok and fresh.ok
    # The refused request released nothing and spent nothing.
    assert agent.releases.spent("heart")[0] == 2


def test_guard_refusals_reach_the_coordinator_with_their_reason_code(tmp_path: Path) -> None:
    agent = statistics_agent(tmp_path, csv_seed=11, max_statistics_answers=1)
    stub = RecordingStub()
    for _ in range(2):
        agent._run_statistics(stub, _task(time.time() + 3600))  # type: ignore[arg-type]
    answered, refused = stub.results
    assert answered.ok
    assert (refused.ok, refused.error_code) == (False, "statistics-budget-exhausted")
    assert "max_statistics_answers 1" in refused.error_message


def test_an_unreadable_release_record_refuses_rather_than_starting_afresh(tmp_path: Path) -> None:
    path = tmp_path / "releases.json"
    path.write_text("{not json")
    with pytest.raises(ReleaseRefused, match=r"release record .* is unreadable") as refused:
        answer_request(_tabular(_rows(40, seed=12)), StatisticsReleases(path), min_count=10)
    assert refused.value.code == "statistics-failed"
    assert path.read_text() == "{not json"


def test_the_site_cli_shows_answers_and_privacy_loss_per_dataset(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from site_agent.cli import app as baton_site

    releases = StatisticsReleases(tmp_path / "state" / "statistics_releases.json")
    answer_request(_notes(40), releases, min_count=10, noise_std=20.0)
    answer_request(_tabular(_rows(40, seed=13)), releases, min_count=10)

    shown = CliRunner().invoke(baton_site, ["statistics-releases", "--data-dir", str(tmp_path),
                                            "--state-dir", str(tmp_path / "state")])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
            for line in shown.output.splitlines() if line.count("│") == 5}  # fmt: skip
    rho = gaussian_rho(math.sqrt(3), 20.0)
    assert rows["notes"] == ["1", f"{rho:.4g}", f"{epsilon_of(rho, 1e-6):.4g}"]
    assert rows["heart"] == ["1", "0", "0"]

    (tmp_path / "state" / "statistics_releases.json").write_text("{")
    broken = CliRunner().invoke(baton_site, ["statistics-releases", "--data-dir", str(tmp_path),
                                             "--state-dir", str(tmp_path / "state")])  # fmt: skip
    assert broken.exit_code == 2 and "is unreadable" in broken.output
