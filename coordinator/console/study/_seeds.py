"""Where a search starts: earlier runs of the ledger as completed trials, seed orders from the
sites' training-set sizes, and a cross-site probe of how each site's adapter transfers."""

from __future__ import annotations

import itertools
import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence

from coordinator.console.admin import TERMINAL_RUN_STATES, AdminClient
from coordinator.console.study._executor import RunExecutor, TrialRunError
from coordinator.console.study._records import (
    _TEMPLATE_FIELDS,
    RunTemplate,
    _link_key,
    trial_run_ids,
)
from coordinator.plan import HyperparameterSpec, PlanError, RunPlan, parse_plan
from ordering import (
    CandidatePlan,
    FloatRange,
    HopHyperparameters,
    IntRange,
    OrderingStudy,
    SearchSpace,
    SearchSpaceError,
    SiteScore,
    TrialOutcome,
    TrialRecord,
)
from protocols.v1 import baton_pb2 as pb

__all__ = [
    "cross_site_probe",
    "heuristic_seed_orders",
    "train_examples_by_site",
    "warm_start_from_ledger",
]

logger = logging.getLogger(__name__)


class _NotAPrior(Exception):
    """Why a run of the ledger cannot seed a study."""


def warm_start_from_ledger(
    client: AdminClient, study: OrderingStudy, template: RunTemplate
) -> list[tuple[str, TrialRecord]]:
    """Adds the coordinator's earlier runs of the study's computation as completed trials.

    Runs made before the search (an earlier study's trials, hand-made runs of the same data)
    cost real training time at the sites; this records them in the study without re-running
    them (`OrderingStudy.add_prior`: full budget, compute cost 0), linked to their run ids like
    `run_search`'s trials. A run is used when it completed, is not yet linked to a trial of the
    study, its plan matches `template` (dataset, task, labels, options, LoRA, base model pin and
    cross-validation: a cross-validation template takes only cross-validation runs with the same
    folds, an ordinary template only ordinary runs), every hop was committed, its hops form a
    plan of the study's space (each cycle visits every site once, the learning rate changes by
    one factor per hop, hop k trains with seed + k: runs of the ``sites`` shorthand repeat one
    seed and are left out), and every site of the plan has a finished validation evaluation of
    its final checkpoint reporting the template's metric. Test evaluations are never read.
    Each run left out is logged at INFO with the reason.

    Args:
        client: An admin connection to the coordinator.
        study: The search to seed.
        template: The study's run template.

    Returns:
        (run id, trial record) of every run added, in the coordinator's order.
    """
    linked = set(trial_run_ids(study).values())
    reference = template.run_plan(study.space.plan(study.space.sites))
    added: list[tuple[str, TrialRecord]] = []
    for run in client.runs():
        if run.status != "completed" or run.run_id in linked:
            continue
        try:
            plan, outcome = _prior_of(run, study, template, reference)
            record = study.add_prior(plan, outcome, note=f"run {run.run_id}")
        except (_NotAPrior, SearchSpaceError) as exc:
            logger.info("run %s (%s) is not a warm start for study %r: %s",
                        run.run_id, run.name, study.study_name, exc)  # fmt: skip
            continue
        study.optuna_study.set_user_attr(_link_key(record.study_name, record.number), run.run_id)
        added.append((run.run_id, record))
    return added


def _prior_of(
    run: pb.RunStatus, study: OrderingStudy, template: RunTemplate, reference: RunPlan
) -> tuple[CandidatePlan, TrialOutcome]:
    """The plan a completed run ran and what it scored, as a trial of `study` would have."""
    try:
        stored = parse_plan(run.plan_json)
    except PlanError as exc:
        raise _NotAPrior(f"its plan cannot be read: {exc}") from exc
    if stored.mode != "sequential":  # its hops are rounds', not a sequential schedule's
        raise _NotAPrior(f"it is a {stored.mode} run; warm starts take sequential runs")
    differing = [
        name for name in _TEMPLATE_FIELDS if getattr(stored, name) != getattr(reference, name)
    ]
    if differing:
        raise _NotAPrior(f"its {', '.join(differing)} differ(s) from the study's")
    hops = stored.expanded_hops()
    if [site for site, _ in hops] != [h.site for h in sorted(run.hops, key=lambda h: h.index)]:
        raise _NotAPrior("its hops do not match its plan")
    skipped = [f"{hop.index} at {hop.site}" for hop in run.hops if hop.status != "committed"]
    if skipped:
        raise _NotAPrior(f"hop(s) {', '.join(skipped)} did not train: it did not run its plan")
    plan = _candidate_of_hops(study.space, hops, study.encoding.name)
    metric = template.metric
    final: dict[str, pb.EvaluationStatus] = {}
    for row in run.evaluations:  # oldest first: a later evaluation replaces an earlier one
        if (
            row.split == "validation"
            and row.status == "done"
            and row.checkpoint_sha256 == run.final_sha256
            and metric in row.metrics
        ):
            final[row.site] = row
    missing = [site for site in plan.sites if site not in final]
    if missing:
        raise _NotAPrior(
            f"no finished validation evaluation of its final checkpoint with {metric!r} at "
            + ", ".join(missing)
        )
    scores = tuple(
        SiteScore(
            site,
            value=float(final[site].metrics[metric]),
            examples=int(final[site].metrics.get("examples", 0)),
            folds=int(final[site].metrics.get("folds", 1)),
        )
        for site in plan.sites
    )
    intermediate: list[tuple[int, float]] = []
    for cycle in range(plan.cycles):
        cycle_hops = RunExecutor._cycle_hops(run, cycle, len(plan.order))
        if all(metric in hop.metrics for hop in cycle_hops):
            intermediate.append(
                (cycle, statistics.fmean(float(hop.metrics[metric]) for hop in cycle_hops))
            )
    return plan, TrialOutcome(scores, RunExecutor._cost(run, plan), tuple(intermediate))


def _candidate_of_hops(
    space: SearchSpace, hops: Sequence[tuple[str, HyperparameterSpec]], encoding: str
) -> CandidatePlan:
    """The plan of `space` whose hops are `hops`.

    Raises:
        SearchSpaceError: If no plan of the space has these hops; the message says why.
    """
    n = len(space.sites)
    if not hops or len(hops) % n:
        raise SearchSpaceError(f"{len(hops)} hop(s) are not whole cycles over {n} sites")
    sites = [site for site, _ in hops]
    orders = [tuple(sites[start : start + n]) for start in range(0, len(sites), n)]
    for cycle, order in enumerate(orders):
        if sorted(order) != sorted(space.sites):
            raise SearchSpaceError(
                f"cycle {cycle} visits {list(order)}, not each of {sorted(space.sites)} once"
            )
    rates = [spec.learning_rate for _, spec in hops]
    if len(rates) == 1:
        allowed = space.learning_rate_decay
        decay = (
            (1.0 if allowed.low <= 1.0 <= allowed.high else allowed.low)
            if isinstance(allowed, FloatRange)
            else float(allowed)
        )
    else:
        decay = rates[1] / rates[0]
        if not all(
            math.isclose(later / earlier, decay, rel_tol=1e-9)
            for earlier, later in itertools.pairwise(rates)
        ):
            raise SearchSpaceError("its learning rate does not change by one factor per hop")
        if not isinstance(space.learning_rate_decay, FloatRange) and math.isclose(
            decay, space.learning_rate_decay, rel_tol=1e-9
        ):
            decay = float(space.learning_rate_decay)
    first = hops[0][1]
    if isinstance(space.epochs, IntRange) and not float(first.epochs).is_integer():
        raise SearchSpaceError(f"its visits last {first.epochs:g} epochs, not a whole number")
    first_visit = {site: spec.steps for site, spec in reversed(hops)}
    plan = CandidatePlan.build(
        orders,
        first,
        learning_rate_decay=decay,
        steps_by_site=first_visit if len(set(first_visit.values())) > 1 else {},
        encoding=encoding,
    )
    for k, (hop, (_, spec)) in enumerate(zip(plan.hops, hops, strict=True)):
        actual = spec.model_dump()
        expected = hop.hyperparameters.model_dump()
        differing = [
            f"{name} {_shown(actual[name])} (the space's schedule: {_shown(expected[name])})"
            for name in actual
            if actual[name] != expected[name]
            # The rate is rebuilt as rate * decay**k from the inferred decay: equal up to rounding.
            and not (name == "learning_rate" and math.isclose(actual[name], expected[name]))
        ]
        if differing:
            raise SearchSpaceError(f"hop {k} trains with " + ", ".join(differing))
    space.params_for(plan, None)  # ranges and fixed values
    return plan


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def heuristic_seed_orders(
    train_examples: Mapping[str, int], sites: Sequence[str]
) -> list[tuple[str, ...]]:
    """Seed orders from what the sites already told the coordinator: their training-set sizes.

    Sequential training forgets early visits most, so the first seed puts the largest site last
    (smallest first); the second is its reverse, a contrasting starting point for the sampler.
    Ties are broken by site name.

    Args:
        train_examples: Training examples per site (from the sites' Hello).
        sites: The sites to order; a site with no count is treated as empty.
    """
    ascending = tuple(sorted(sites, key=lambda site: (train_examples.get(site, 0), site)))
    descending = tuple(reversed(ascending))
    return [ascending] if ascending == descending else [ascending, descending]


def train_examples_by_site(client: AdminClient, dataset: str) -> dict[str, int]:
    """Each connected site's training-set size for `dataset`, as reported at its Hello."""
    sizes: dict[str, int] = {}
    for site in client.sites():
        for summary in site.datasets:
            if summary.name == dataset:
                sizes[site.name] = int(summary.train_examples)
    return sizes


def cross_site_probe(
    client: AdminClient,
    template: RunTemplate,
    sites: Sequence[str],
    hyperparameters: HopHyperparameters,
    *,
    run_name: str = "probe",
    poll_seconds: float = 0.25,
    timeout: float = 3600.0,
) -> dict[tuple[str, str], float]:
    """A cheap cross-site probe: each site trains briefly from scratch, every site scores it.

    Each probe is a real one-hop run at one site (under the template's bundle, so a study's
    approval covers it), then every site of `sites` scores that run's model on its own
    validation data (the cross-validated score for a cross-validation template). Test splits
    are never asked for. `ordering.probe_order` turns the result into a seed order.

    Args:
        client: An admin connection.
        template: The study's run template (dataset, task, metric, bounds...).
        sites: The sites to probe.
        hyperparameters: The probe visit's settings (short: it only has to tell sites apart).
        run_name: Prefix of the probe runs' names.
        poll_seconds: How often runs are polled.
        timeout: Seconds allowed for each probe run and its evaluations.

    Returns:
        ``scores[(trained_at, evaluated_at)]``: the template's metric.

    Raises:
        TrialRunError: If a probe run or one of its evaluations fails.
    """
    scores: dict[tuple[str, str], float] = {}
    for site in sites:
        plan = template.run_plan(
            CandidatePlan.build([(site,)], hyperparameters), name=f"{run_name}: {site}"
        )
        run_id = client.start_run(plan)
        deadline = time.monotonic() + timeout
        while (run := client.run(run_id)).status not in TERMINAL_RUN_STATES:
            if time.monotonic() > deadline:
                client.control(run_id, "abort", "probe took too long")
                raise TrialRunError(f"probe run {run_id} at {site} did not finish")
            time.sleep(poll_seconds)
        if run.status != "completed":
            raise TrialRunError(f"probe run {run_id} at {site} {run.status}: {run.error}")
        wanted = set(client.evaluate_run(run_id, "validation", list(sites)))
        try:
            run = client.wait_for_evaluations(run_id, timeout)
        except TimeoutError as exc:
            raise TrialRunError(str(exc)) from exc
        for row in run.evaluations:
            if row.evaluation_id not in wanted:
                continue
            if row.status != "done" or template.metric not in row.metrics:
                raise TrialRunError(
                    f"{row.site} could not score the probe trained at {site}: "
                    f"{row.error or 'no ' + template.metric}"
                )
            scores[(site, row.site)] = float(row.metrics[template.metric])
        logger.info("probe at %s scored by %d sites", site, len(wanted))
    return scores
