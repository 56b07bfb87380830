"""The ordering search against a real in-process coordinator, with scripted sites answering."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import optuna
import pytest
from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.study import (
    RunExecutor,
    RunNotApproved,
    RunTemplate,
    TrialRunError,
    approval_bounds,
    attach_run_template,
    cross_site_probe,
    heuristic_seed_orders,
    plan_from_study,
    run_search,
    run_template_of,
    scale_hyperparameters,
    study_storage_url,
    trial_run_ids,
    warm_start_from_ledger,
)
from coordinator.console.study_cli import study_app
from coordinator.ledger import Ledger
from coordinator.plan import RunPlan, parse_plan
from coordinator.server import Coordinator, build_server
from ordering import (
    CandidatePlan,
    FloatRange,
    HopHyperparameters,
    IntRange,
    OrderingStudy,
    PlanPruned,
    SearchSpace,
    StudyMismatch,
    probe_order,
)
from protocols.v1 import baton_pb2 as pb
from tests.conftest import SITES, LoopThread, Pki
from tests.coordinator_tests.conftest import BASE, coordinator_settings
from tests.coordinator_tests.test_service import ScriptedSite

TRAIN_SECONDS = {"site-a": 1.5, "site-b": 2.0, "site-c": 0.25}
VALIDATION = {"site-a": (0.9, 10), "site-b": (0.7, 20), "site-c": (0.8, 30)}
TEMPLATE = RunTemplate(dataset="notes", labels=("x", "y"))


@pytest.fixture(autouse=True)
def _quiet_optuna() -> Iterator[None]:
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    yield
    optuna.logging.set_verbosity(previous)


class ScriptedSites:
    """Answers every site's tasks on background threads, as site agents would.

    A hop reports validation accuracy ``0.1 * (hop_index + 1)`` and trains for
    `TRAIN_SECONDS[site]` (site clock); an evaluation reports `VALIDATION[site]`. Hops with
    index >= `hold_from` wait until `release` is set; every hop fails with `fail` (an error
    code) when it is set.
    """

    def __init__(self, pki: Pki, port: int) -> None:
        self.sites = {name: ScriptedSite(pki, name, port) for name in SITES}
        self.hold_from: int | None = None
        self.fail = ""
        # Seconds after its commit that a hop's validation metrics come (None: with the result).
        self.validate_after: float | None = None
        self.release = threading.Event()
        self.stop = threading.Event()
        self.hop_tasks: list[pb.HopTask] = []
        self.evaluations: list[tuple[str, str]] = []  # (site, split)
        self._threads = [
            threading.Thread(target=self._serve, args=(site,), daemon=True)
            for site in self.sites.values()
        ]

    def start(self) -> None:
        for site in self.sites.values():
            site.connect()
        for thread in self._threads:
            thread.start()

    def _serve(self, site: ScriptedSite) -> None:
        while not self.stop.is_set():
            try:
                task = site.tasks.get(timeout=0.1)
            except Exception:
                continue
            try:
                if task.WhichOneof("kind") == "hop":
                    self._hop(site, task.hop)
                else:
                    self._evaluate(site, task.evaluation)
            except grpc.RpcError:
                pass  # e.g. a held hop of a run that was aborted meanwhile

    def _hop(self, site: ScriptedSite, task: pb.HopTask) -> None:
        self.hop_tasks.append(task)
        if self.hold_from is not None and task.hop_index >= self.hold_from:
            while not (self.release.is_set() or self.stop.is_set()):
                self.release.wait(0.05)
            if self.stop.is_set():
                return
        started = 1_000_000_000 * (task.hop_index + 1)
        finished = started + int(TRAIN_SECONDS[site.name] * 1e9)
        if self.fail:
            message = (  # the site agent's own wording for a refusal
                f"run bundle {'0' * 64} is not approved at this site; review it ..."
                if self.fail == "not-approved"
                else "scripted failure"
            )
            result = pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, ok=False,
                                  error_code=self.fail, error_message=message)  # fmt: skip
        else:
            ref = site.upload(task, site.bundle(task, float(task.hop_index)))
            validation = {"accuracy": 0.1 * (task.hop_index + 1)}
            result = pb.HopResult(
                hop_id=task.hop_id, lease_token=task.lease_token, ok=True, output_checkpoint=ref,
                metrics={**(validation if self.validate_after is None else {}), "examples": 5},
                train_started_at_ns=started, train_finished_at_ns=finished,
            )  # fmt: skip
        site.stub.ReportHopResult(result, timeout=10)
        if self.validate_after is not None and not self.fail:
            time.sleep(self.validate_after)  # as a site's validation pass after its commit
            report = pb.HopValidation(hop_id=task.hop_id, ok=True, metrics=validation)
            site.stub.ReportHopValidation(report, timeout=10)

    def _evaluate(self, site: ScriptedSite, task: pb.EvaluationTask) -> None:
        self.evaluations.append((site.name, task.split))
        accuracy, examples = VALIDATION[site.name]
        site.stub.ReportEvaluation(
            pb.EvaluationResult(evaluation_id=task.evaluation_id, lease_token=task.lease_token,
                                ok=True, metrics={"accuracy": accuracy, "examples": examples}),
            timeout=10,
        )  # fmt: skip

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(5)
        for site in self.sites.values():
            site.close()


@pytest.fixture
def coordinator(
    pki: Pki, tmp_path: Path, loop_thread: LoopThread, sqlite_ledger_url: str
) -> Iterator[Coordinator]:
    settings = coordinator_settings(
        pki,
        tmp_path / "state",
        database_url=sqlite_ledger_url,
        heartbeat_interval_ms=200,
    )
    server = loop_thread.run(build_server(settings))
    yield server
    loop_thread.run(server.stop(0))


@pytest.fixture
def sites(pki: Pki, coordinator: Coordinator) -> Iterator[ScriptedSites]:
    scripted = ScriptedSites(pki, coordinator.port)
    scripted.start()
    yield scripted
    scripted.close()


@pytest.fixture
def admin(pki: Pki, coordinator: Coordinator, sites: ScriptedSites) -> Iterator[AdminClient]:
    client = AdminClient(f"localhost:{coordinator.port}", pki.tls("admin"))
    client.wait_for_sites(set(SITES), timeout=10)
    yield client
    client.close()


def _plan(cycles: int = 2, steps: int = 20) -> CandidatePlan:
    return CandidatePlan.build(
        [("site-b", "site-a", "site-c")] * cycles,
        HopHyperparameters(steps=steps, learning_rate=1e-3),
    )


def _no_report(cycle: int, value: float) -> None:
    pass


def test_trial_is_scored_by_validation_evaluations_and_costs_are_summed_per_site(
    admin: AdminClient, sites: ScriptedSites
) -> None:
    executor = RunExecutor(admin, TEMPLATE, poll_seconds=0.02)
    reported: list[tuple[int, float]] = []
    outcome = executor.execute(
        _plan(cycles=2), budget=1.0, report=lambda c, v: reported.append((c, v))
    )

    [executed] = executor.runs
    run = admin.run(executed.run_id)
    assert run.status == "completed"
    assert [hop.site for hop in run.hops] == ["site-b", "site-a", "site-c"] * 2
    # Sites were asked for their validation split only, once each.
    assert sorted(sites.evaluations) == [(site, "validation") for site in SITES]
    assert {s.site: (s.value, s.examples, s.folds) for s in outcome.site_scores} == {
        site: (pytest.approx(acc), n, 1) for site, (acc, n) in VALIDATION.items()
    }
    # Two visits per site: training seconds summed per site, from the hops' site clocks.
    assert dict(outcome.cost_seconds_by_site) == pytest.approx(
        {site: 2 * seconds for site, seconds in TRAIN_SECONDS.items()}
    )
    # After each cycle: the mean of that cycle's hop validation accuracies (0.1 * (index + 1)).
    assert reported == [(0, pytest.approx(0.2)), (1, pytest.approx(0.5))]
    assert [task.hyperparameters.steps for task in sites.hop_tasks] == [20] * 6


def test_the_last_cycle_is_reported_once_its_validation_comes_after_the_run_completed(
    admin: AdminClient, sites: ScriptedSites
) -> None:
    sites.validate_after = 0.5  # the last hop's metrics come well after the run completed
    executor = RunExecutor(admin, TEMPLATE, poll_seconds=0.02)
    reported: list[tuple[int, float]] = []

    outcome = executor.execute(
        _plan(cycles=2), budget=1.0, report=lambda c, v: reported.append((c, v))
    )

    assert reported == [(0, pytest.approx(0.2)), (1, pytest.approx(0.5))]
    assert outcome.intermediate == tuple(reported)


def test_a_cycle_whose_validation_never_comes_is_left_out_after_the_grace_not_the_trial(
    admin: AdminClient, sites: ScriptedSites, caplog: pytest.LogCaptureFixture
) -> None:
    sites.validate_after = 3.0  # longer than the grace: never, for this trial
    executor = RunExecutor(admin, TEMPLATE, poll_seconds=0.02, validation_grace_seconds=0.5)
    reported: list[tuple[int, float]] = []

    with caplog.at_level(logging.WARNING, logger="coordinator.console.study"):
        outcome = executor.execute(
            _plan(cycles=1), budget=1.0, report=lambda c, v: reported.append((c, v))
        )

    assert reported == [] and outcome.intermediate == ()
    assert {score.site for score in outcome.site_scores} == {"site-a", "site-b", "site-c"}
    warning = next(r.getMessage() for r in caplog.records if "not reported" in r.getMessage())
    assert "cycle 0" in warning and "'accuracy'" in warning
    assert all(f"at {site}" in warning for site in ("site-a", "site-b", "site-c"))


def test_reduced_budget_runs_shorter_visits_of_the_same_schedule() -> None:
    document = RunTemplate(dataset="notes", labels=("x", "y")).plan_document(
        _plan(cycles=2, steps=21), budget=0.5
    )
    assert [hop["hyperparameters"]["steps"] for hop in document["hops"]] == [10] * 6
    assert [hop["site"] for hop in document["hops"]] == ["site-b", "site-a", "site-c"] * 2
    assert scale_hyperparameters({"steps": 3, "warmup_steps": 4, "epochs": 2}, 0.25) == {
        "steps": 1, "warmup_steps": 1, "epochs": 0.5}  # fmt: skip
    with pytest.raises(ValueError, match="budget"):
        scale_hyperparameters({"steps": 3}, 1.5)


def test_pruned_trial_aborts_its_run_and_reports_what_it_cost(
    admin: AdminClient, sites: ScriptedSites
) -> None:
    sites.hold_from = 3  # the second cycle never starts training before the prune
    executor = RunExecutor(admin, TEMPLATE, poll_seconds=0.02)

    def prune(cycle: int, value: float) -> None:
        raise PlanPruned(f"pruned after cycle {cycle}")

    with pytest.raises(PlanPruned) as pruned:
        executor.execute(_plan(cycles=2), budget=1.0, report=prune)

    run = admin.run(executor.runs[0].run_id)
    assert run.status == "aborted"
    assert [hop.status for hop in run.hops[:3]] == ["committed"] * 3
    assert pruned.value.cost_seconds_by_site == pytest.approx(TRAIN_SECONDS)
    assert sites.evaluations == []


def test_an_interrupt_while_the_trials_run_is_created_still_aborts_that_run(
    admin: AdminClient, sites: ScriptedSites, monkeypatch: pytest.MonkeyPatch
) -> None:
    sites.hold_from = 0  # the run stays running until it is aborted
    start_run = admin.start_run

    def start_then_interrupted(run_plan: RunPlan) -> str:
        run_id = start_run(run_plan)  # the coordinator has created the run ...
        signal.raise_signal(signal.SIGINT)  # ... and Ctrl-C comes before its id is returned
        return run_id

    monkeypatch.setattr(admin, "start_run", start_then_interrupted)
    executor = RunExecutor(admin, TEMPLATE, poll_seconds=0.02)

    with pytest.raises(KeyboardInterrupt):
        executor.execute(_plan(), budget=1.0, report=lambda cycle, value: None)

    [run] = admin.runs()
    assert [r.run_id for r in executor.runs] == [run.run_id]
    assert run.status == "aborted"
    assert "the ordering search stopped this trial" in admin.run(run.run_id).error


def test_failed_run_fails_the_trial_and_the_search_goes_on(
    admin: AdminClient, sites: ScriptedSites
) -> None:
    sites.fail = "training-failed"
    template = RunTemplate(dataset="notes", labels=("x", "y"), failure={"on_failure": "abort"})
    study = OrderingStudy.create(
        None, "failing", SearchSpace(sites=SITES, steps=5), "lehmer", seed=0
    )
    attach_run_template(study, template)
    executor = RunExecutor(admin, template, poll_seconds=0.02)

    records = run_search(study, executor, 2)

    assert [record.state for record in records] == ["FAIL", "FAIL"]
    assert all("TrialRunError" in (r.error or "") and "failed" in (r.error or "") for r in records)
    assert [admin.run(r.run_id).status for r in executor.runs] == ["failed", "failed"]
    with pytest.raises(TrialRunError, match="failed"):
        executor.execute(_plan(cycles=1), budget=1.0, report=_no_report)


def test_unapproved_bundle_stops_the_search_at_the_first_refusal(
    admin: AdminClient, sites: ScriptedSites
) -> None:
    sites.fail = "not-approved"
    space = SearchSpace(sites=SITES, steps=5)
    template = RunTemplate(dataset="notes", labels=("x", "y"), bounds=approval_bounds(space))
    study = OrderingStudy.create(None, "unapproved", space, "lehmer", seed=0)
    executor = RunExecutor(admin, template, poll_seconds=0.02)

    with pytest.raises(RunNotApproved) as refused:
        run_search(study, executor, 3)

    bundle = template.approval_bundle(space.plan(SITES)).sha256
    assert refused.value.bundle_sha256 == bundle and bundle in str(refused.value)
    # Not retried: a refusal the site would repeat ends the run at once.
    run = admin.run(executor.runs[0].run_id)
    assert run.status in ("failed", "aborted")
    assert run.hops[0].error_code == "not-approved" and run.hops[0].status == "failed"
    assert [record.state for record in study.history()] == ["FAIL"]


def test_a_study_whose_bundle_a_site_did_not_approve_stops_before_any_run(
    admin: AdminClient, sites: ScriptedSites
) -> None:
    space = SearchSpace(sites=SITES, steps=5)
    template = RunTemplate(dataset="notes", labels=("x", "y"), bounds=approval_bounds(space))
    bundle = template.approval_bundle(space.plan(SITES)).sha256
    # site-a tells the coordinator (at hello) that it approved some other bundle only.
    request = pb.HelloRequest(protocol_version=1, approved_bundles=["0" * 64])
    request.base_models.add(name="tiny", sha256=BASE)
    request.datasets.add(name="notes", task="seq-classification", labels=["x", "y"])
    sites.sites["site-a"].stub.Hello(request, timeout=30)
    study = OrderingStudy.create(None, "preflight", space, "lehmer", seed=0)
    executor = RunExecutor(admin, template, poll_seconds=0.02)

    with pytest.raises(RunNotApproved) as refused:
        run_search(study, executor, 3)

    assert refused.value.bundle_sha256 == bundle
    assert f"site-a: has not approved the run bundle {bundle}" in str(refused.value)
    assert admin.runs() == [] and sites.hop_tasks == []


def test_every_trial_of_a_study_shares_one_approval_bundle() -> None:
    space = SearchSpace(
        sites=SITES, cycles=2, learning_rate=FloatRange(1e-4, 1e-2, log=True),
        learning_rate_decay=FloatRange(0.8, 1.0), steps=IntRange(4, 30),
    )  # fmt: skip
    template = RunTemplate(dataset="notes", labels=("x", "y"), bounds=approval_bounds(space))
    plans = [
        space.plan(("site-a", "site-b", "site-c"), learning_rate=1e-4, learning_rate_decay=0.8,
                   steps=4),
        space.plan(("site-c", "site-a", "site-b"), learning_rate=1e-2, learning_rate_decay=1.0,
                   steps=30),
    ]  # fmt: skip
    bundles = {template.approval_bundle(plan).sha256 for plan in plans}
    bundles |= {template.run_plan(plans[0], budget=0.1).approval_bundle().sha256}
    assert len(bundles) == 1
    assert template.run_plan(plans[1]).bounds["steps"] == (1.0, 30.0)


def test_study_in_sqlite_survives_reopening_with_its_runs_and_best_plan(
    admin: AdminClient, sites: ScriptedSites, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'studies.sqlite3'}"
    space = SearchSpace(sites=SITES, steps=5)
    study = OrderingStudy.create(storage, "persisted", space, "lehmer", seed=1)
    attach_run_template(study, TEMPLATE)
    executor = RunExecutor(admin, TEMPLATE, poll_seconds=0.02)
    records = run_search(study, executor, 2, on_trial=lambda record, run_id: None)
    assert [r.state for r in records] == ["COMPLETE", "COMPLETE"]
    del study

    reopened = OrderingStudy.load(storage, "persisted")
    assert [(r.number, r.value, r.plan) for r in reopened.history()] == [
        (r.number, r.value, r.plan) for r in records
    ]
    assert run_template_of(reopened) == TEMPLATE
    links = trial_run_ids(reopened)
    ran = [r for r in records if r.duplicate_of is None]
    assert sorted(links.values()) == sorted(run.run_id for run in executor.runs)
    for record in ran:
        run = admin.run(links[("persisted", record.number)])
        assert run.status == "completed"
        assert record.plan is not None
        assert [hop.site for hop in run.hops] == [hop.site for hop in record.plan.hops]
    # The value a trial scored is the mean of the sites' validation accuracies.
    assert records[0].value == pytest.approx(sum(a for a, _ in VALIDATION.values()) / 3)

    plan = plan_from_study(storage, "persisted")
    assert plan.name == "persisted-best" and plan.dataset == "notes"
    assert [site for site, _ in plan.expanded_hops()] == list(reopened.best_plan().order)
    with pytest.raises(StudyMismatch, match="dataset"):
        attach_run_template(reopened, RunTemplate(dataset="other", labels=("x", "y")))


def test_study_cli_runs_trials_then_shows_status_and_the_best_plan(
    admin: AdminClient,
    coordinator: Coordinator,
    pki: Pki,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The CLI configures process-wide logging; keep the test process's own.
    monkeypatch.setattr("coordinator.console.study_cli.configure_logging", lambda *args: None)
    monkeypatch.setattr("coordinator.console.study_cli._quiet_optuna", lambda: None)
    runner = CliRunner()
    storage = f"sqlite:///{tmp_path / 'cli-studies.sqlite3'}"
    tls = pki.tls("admin")
    started_args = [
        "start", "--name", "cli", "--dataset", "notes", "--labels", "x", "--labels", "y",
        *(arg for site in SITES for arg in ("--sites", site)),
        "--lr-min", "1e-3", "--lr-max", "1e-3", "--steps-min", "4", "--steps-max", "8",
        "--seed", "0", "--storage", storage,
        "--coordinator", f"localhost:{coordinator.port}", "--ca", str(tls.ca_certificate),
        "--cert", str(tls.certificate), "--key", str(tls.private_key),
    ]  # fmt: skip
    started = runner.invoke(study_app, [*started_args, "--trials", "2", "--seed-orders", "sizes"])
    assert started.exit_code == 0, started.output
    assert "seed orders:" in started.output and "best plan so far" in started.output

    status = runner.invoke(study_app, ["status", "cli", "--storage", storage])
    assert status.exit_code == 0, status.output
    assert status.output.count("COMPLETE") == 2

    # A second study over the same space starts from the first one's runs.
    earlier = [run.run_id for run in admin.runs() if run.status == "completed"]
    warm_args = [*started_args, "--warm-start", "--trials", "1"]
    warm_args[warm_args.index("--name") + 1] = "cli-warm"
    warm = runner.invoke(study_app, warm_args)
    assert warm.exit_code == 0, warm.output
    assert f"warm start: {len(earlier)} earlier run(s) added" in warm.output
    warm_status = runner.invoke(study_app, ["status", "cli-warm", "--storage", storage])
    assert warm_status.output.count("COMPLETE (warm)") == len(earlier) == 2

    best = runner.invoke(study_app, ["best", "cli", "--storage", storage])
    assert best.exit_code == 0, best.output
    document = json.loads(best.output)
    assert document["dataset"] == "notes" and len(document["hops"]) == len(SITES)
    assert admin.start_run(plan_from_study(storage, "cli"))  # the coordinator accepts it

    missing = runner.invoke(study_app, ["best", "nope", "--storage", storage])
    assert missing.exit_code == 2 and "no study named" in missing.output


def _completed(admin: AdminClient, run_id: str) -> pb.RunStatus:
    deadline = time.monotonic() + 60
    while (run := admin.run(run_id)).status != "completed":
        assert run.status == "running" and time.monotonic() < deadline, run
        time.sleep(0.02)
    return run


def test_warm_start_adds_earlier_runs_of_the_same_computation_without_running_them(
    admin: AdminClient, sites: ScriptedSites, caplog: pytest.LogCaptureFixture
) -> None:
    space = SearchSpace(
        sites=SITES, cycles=2, learning_rate=FloatRange(1e-4, 1e-2, log=True),
        learning_rate_decay=FloatRange(0.8, 1.0), steps=IntRange(3, 8),
    )  # fmt: skip
    template = RunTemplate(dataset="notes", labels=("x", "y"), bounds=approval_bounds(space))
    earlier = OrderingStudy.create(None, "earlier", space, seed=0)
    attach_run_template(earlier, template)
    executor = RunExecutor(admin, template, poll_seconds=0.02)
    [ran] = run_search(earlier, executor, 1)
    [trial_run] = executor.runs
    assert ran.state == "COMPLETE" and ran.plan is not None and ran.plan.learning_rate_decay != 1
    # The same plan on another dataset, and scored on test splits only: neither is a trial.
    RunExecutor(admin, replace(template, dataset="other"), poll_seconds=0.02).execute(
        ran.plan, budget=1.0, report=_no_report
    )
    test_only = admin.start_run(template.run_plan(ran.plan, name="test only"))
    _completed(admin, test_only)
    admin.evaluate_run(test_only, "test")
    admin.wait_for_evaluations(test_only, 30)
    # The run status carries the plan the run was started with.
    stored = json.loads(admin.run(trial_run.run_id).plan_json)
    assert parse_plan(stored) == template.run_plan(ran.plan, name=stored["name"])
    runs, hops, evaluations = len(admin.runs()), len(sites.hop_tasks), len(sites.evaluations)

    study = OrderingStudy.create(None, "warm", space, seed=1)
    attach_run_template(study, template)
    with caplog.at_level(logging.INFO, logger="coordinator.console.study"):
        added = warm_start_from_ledger(admin, study, template)

    [(run_id, record)] = added
    assert run_id == trial_run.run_id
    assert record.state == "COMPLETE" and record.warm_start == f"run {run_id}"
    assert record.plan == ran.plan and record.value == pytest.approx(ran.value)
    assert record.site_scores == ran.site_scores
    assert record.intermediate == ran.intermediate
    assert record.compute_seconds == 0.0 and ran.compute_seconds > 0
    assert trial_run_ids(study) == {("warm", record.number): run_id}
    assert study.best_plan() == ran.plan
    # Nothing ran and nothing was evaluated again.
    assert (len(admin.runs()), len(sites.hop_tasks), len(sites.evaluations)) == (
        runs, hops, evaluations)  # fmt: skip
    skipped = "\n".join(r.getMessage() for r in caplog.records)
    assert "dataset differ" in skipped and "no finished validation evaluation" in skipped
    assert warm_start_from_ledger(admin, study, template) == []  # linked: not added twice

    # A cross-validation study takes only cross-validation runs.
    folds = {"folds": 3, "min_validation_rows": 0}
    cv_study = OrderingStudy.create(None, "warm-cv", space, seed=1)
    assert warm_start_from_ledger(admin, cv_study, replace(template, cross_validation=folds)) == []

    # Runs started by hand count when their hops are a plan of the space (a study's final run,
    # `baton run start --from-study`); the shorthand form repeats one seed at every hop.
    by_hand = space.plan(("site-c", "site-b", "site-a"), learning_rate=1e-3, steps=4)
    shorthand = parse_plan({"name": "shorthand", "dataset": "notes", "labels": ["x", "y"],
                            "sites": ["site-c", "site-b", "site-a"], "cycles": 2,
                            "defaults": {"learning_rate": 1e-3, "steps": 4}})  # fmt: skip
    by_hand_ids = [
        admin.start_run(template.run_plan(by_hand, name="by hand", final=True)),
        admin.start_run(shorthand),
    ]
    for by_hand_id in by_hand_ids:
        _completed(admin, by_hand_id)
        admin.evaluate_run(by_hand_id, "validation")
        admin.wait_for_evaluations(by_hand_id, 30)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="coordinator.console.study"):
        [(again_id, again)] = warm_start_from_ledger(admin, study, template)
    assert again_id == by_hand_ids[0] and again.plan == replace(by_hand, encoding="lehmer")
    assert again.params["steps"] == 4 and again.plan.learning_rate_decay == 1.0
    assert "hop 1 trains with seed 0 (the space's schedule: 1)" in caplog.text


def test_cross_site_probe_trains_once_per_site_and_every_site_scores_every_probe(
    admin: AdminClient, sites: ScriptedSites
) -> None:
    probe = HopHyperparameters(steps=3, learning_rate=1e-3)
    scores = cross_site_probe(admin, TEMPLATE, SITES, probe, poll_seconds=0.02)

    # One one-hop run per site, at that site, with the probe's short visit.
    assert [task.hop_index for task in sites.hop_tasks] == [0, 0, 0]
    assert all(task.hyperparameters.steps == 3 for task in sites.hop_tasks)
    runs = [run for run in admin.runs() if run.name.startswith("probe")]
    assert sorted(run.hops[0].site for run in runs) == sorted(SITES)
    # Every site scored every probe (its own too) on validation data, never on test.
    assert sorted(sites.evaluations) == sorted(
        (site, "validation") for site in SITES for _ in SITES
    )
    assert scores == {(a, b): pytest.approx(VALIDATION[b][0]) for a in SITES for b in SITES}
    # The scripted sites score every model alike, so typicality follows the other sites'
    # scores: site-a's probe is judged by b and c (0.75), b's by a and c (0.85), c's by a and
    # b (0.8). Least typical first.
    assert probe_order(scores) == ("site-a", "site-c", "site-b")


def test_heuristic_seed_orders_put_the_largest_site_last() -> None:
    sizes = {"site-a": 50, "site-b": 10, "site-c": 300}
    assert heuristic_seed_orders(sizes, SITES) == [
        ("site-b", "site-a", "site-c"),
        ("site-c", "site-a", "site-b"),
    ]


def test_study_storage_sits_beside_the_ledger_without_touching_its_schema(
    database_url: str,
) -> None:
    ledger = Ledger(database_url)
    ledger.migrate()
    try:
        storage = study_storage_url(database_url)
        assert storage != database_url
        study = OrderingStudy.create(storage, "beside", SearchSpace(sites=SITES), "lehmer")
        study.optuna_study.set_user_attr("probe", 1)
        ledger.migrate()  # the ledger's Alembic revision is untouched
        assert ledger.runs() == []
        assert OrderingStudy.load(storage, "beside").optuna_study.user_attrs["probe"] == 1
        assert study_storage_url(database_url) == storage  # idempotent
    finally:
        ledger.close()
    if database_url.startswith("sqlite"):
        assert storage.endswith("ledger-studies.sqlite3")
    with pytest.raises(ValueError, match="in-memory"):
        study_storage_url("sqlite://")


def test_study_cli_dry_run_prints_the_bundle_the_sites_approve_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("coordinator.console.study_cli.configure_logging", lambda *args: None)
    monkeypatch.setattr("coordinator.console.study_cli._quiet_optuna", lambda: None)
    args = ["start", "--name", "dry", "--dataset", "notes", "--labels", "x", "--labels", "y",
            "--sites", "site-a", "--sites", "site-b", "--steps-min", "5", "--steps-max", "9",
            "--storage", f"sqlite:///{tmp_path / 's.sqlite3'}", "--dry-run"]  # fmt: skip
    result = CliRunner().invoke(study_app, args)
    assert result.exit_code == 0, result.output
    space = SearchSpace(
        sites=("site-a", "site-b"), learning_rate=FloatRange(1e-4, 1e-2, log=True),
        steps=IntRange(5, 9),
    )  # fmt: skip
    template = RunTemplate(dataset="notes", labels=("x", "y"), bounds=approval_bounds(space))
    assert template.approval_bundle(space.plan(space.sites)).sha256 in result.output
    assert not (tmp_path / "s.sqlite3").exists()  # nothing stored, nothing started
    bad = CliRunner().invoke(study_app, [*args[:-1], "--labels", "x"])
    assert bad.exit_code == 2 and "labels" in bad.output


def test_study_status_reports_whether_the_order_is_worth_searching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ordering import IntRange, OrderingStudy, SearchSpace, SyntheticObjective

    monkeypatch.setattr("coordinator.console.study_cli._quiet_optuna", lambda: None)
    storage = f"sqlite:///{tmp_path / 'importance.sqlite3'}"
    objective = SyntheticObjective(4, seed=0)  # the order decides; steps barely matter
    space = SearchSpace(sites=objective.sites, steps=IntRange(5, 20))
    study = OrderingStudy.create(storage, "orders", space, "lehmer", seed=0)
    study.optimize(objective, n_trials=3)
    runner = CliRunner()
    early = runner.invoke(study_app, ["status", "orders", "--storage", storage])
    assert early.exit_code == 0, early.output
    assert "not measured (needs at least 8 completed trials, has 3)" in " ".join(
        early.output.split()
    )
    study.optimize(objective, n_trials=9)
    later = runner.invoke(study_app, ["status", "orders", "--storage", storage])
    assert later.exit_code == 0, later.output
    said = " ".join(later.output.split())
    assert "parameter importances over 12 trials (PED-ANOVA): order" in said
    assert "order share" in said


def test_approval_bounds_cover_the_consolidation_cycle() -> None:
    space = SearchSpace(
        sites=SITES, cycles=3, learning_rate=FloatRange(1e-4, 1e-2, log=True),
        steps=IntRange(5, 9), steps_split_over_cycles=True, consolidation_steps=IntRange(1, 12),
        consolidation_learning_rate_factor=FloatRange(0.05, 0.5, log=True),
    )  # fmt: skip
    bounds = approval_bounds(space)
    space.check_within(bounds)  # every hop of every plan is within what the sites approve
    assert bounds["steps"] == (1.0, 12.0)
    assert bounds["learning_rate"][0] == pytest.approx(1e-4 * 0.05)


def test_study_cli_searches_the_forgetting_controls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("coordinator.console.study_cli.configure_logging", lambda *args: None)
    monkeypatch.setattr("coordinator.console.study_cli._quiet_optuna", lambda: None)
    args = ["start", "--name", "dry", "--dataset", "notes", "--labels", "x", "--labels", "y",
            "--sites", "site-a", "--sites", "site-b", "--cycles", "2", "--steps-min", "5",
            "--steps-max", "9", "--split-steps-over-cycles", "--lr-decay-min", "0.8",
            "--proximal-mu-max", "0.5", "--consolidation-steps", "4",
            "--storage", f"sqlite:///{tmp_path / 's.sqlite3'}", "--dry-run"]  # fmt: skip
    result = CliRunner().invoke(study_app, args)
    assert result.exit_code == 0, result.output
    space = SearchSpace(
        sites=("site-a", "site-b"), cycles=2, learning_rate=FloatRange(1e-4, 1e-2, log=True),
        steps=IntRange(5, 9), steps_split_over_cycles=True,
        learning_rate_decay=FloatRange(0.8, 1.0), proximal_mu=FloatRange(0.0, 0.5),
        consolidation_steps=IntRange(1, 4),
        consolidation_learning_rate_factor=FloatRange(0.05, 0.5, log=True),
    )  # fmt: skip
    template = RunTemplate(dataset="notes", labels=("x", "y"), bounds=approval_bounds(space))
    assert template.approval_bundle(space.plan(space.sites)).sha256 in result.output
    bad = CliRunner().invoke(study_app, [*args[:-1], "--consolidation-lr-factor-max", "2"])
    assert bad.exit_code == 2 and "consolidation_learning_rate_factor" in bad.output
