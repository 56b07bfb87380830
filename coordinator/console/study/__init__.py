"""The ordering search against a live coordinator: each trial is a real run, scored by the sites.

`RunExecutor` implements `ordering.PlanExecutor`: it turns a `CandidatePlan` into a run plan,
starts the run, reports a value after every full cycle (so the search can prune it), then has
every site of the run score the final adapter on its own *validation* split. Test splits are
never asked for here: they are for the final report of the plan the search picks.
"""

from coordinator.console.study._controls import forgetting_controls
from coordinator.console.study._executor import (
    ExecutedRun,
    RunExecutor,
    RunNotApproved,
    TrialRunError,
    hop_training_seconds,
    run_search,
)
from coordinator.console.study._records import (
    STUDY_SCHEMA,
    RunTemplate,
    approval_bounds,
    attach_run_template,
    plan_from_study,
    run_template_of,
    scale_hyperparameters,
    study_storage_url,
    trial_run_ids,
)
from coordinator.console.study._seeds import (
    cross_site_probe,
    heuristic_seed_orders,
    train_examples_by_site,
    warm_start_from_ledger,
)

__all__ = [
    "STUDY_SCHEMA",
    "ExecutedRun",
    "RunExecutor",
    "RunNotApproved",
    "RunTemplate",
    "TrialRunError",
    "approval_bounds",
    "attach_run_template",
    "cross_site_probe",
    "forgetting_controls",
    "heuristic_seed_orders",
    "hop_training_seconds",
    "plan_from_study",
    "run_search",
    "run_template_of",
    "scale_hyperparameters",
    "study_storage_url",
    "train_examples_by_site",
    "trial_run_ids",
    "warm_start_from_ledger",
]
