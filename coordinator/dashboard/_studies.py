"""Read models of the ordering studies kept beside the ledger (Optuna, imported only here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import create_engine, inspect, make_url, text
from sqlalchemy.exc import SQLAlchemyError

from coordinator.errors import NotFound

__all__ = ["StudyDetail", "StudySummary", "TrialView", "list_studies", "study_detail"]


class TrialView(BaseModel):
    number: int
    budget: float
    state: str
    value: float | None
    order: str
    hyperparameters: dict[str, str]
    compute_seconds: float
    run_id: str | None


class StudySummary(BaseModel):
    name: str
    trials: int


class StudyDetail(BaseModel):
    name: str
    direction: str
    trials: list[TrialView]
    best_so_far: list[tuple[int, float]]
    best_plan: str | None
    compute_seconds_by_site: dict[str, float]
    importances: dict[str, float]


def _storage(database_url: str) -> str | None:
    """The study storage beside this ledger, or None when no study was ever stored."""
    from coordinator.console.study import study_storage_url

    try:
        url = study_storage_url(database_url, create_schema=False)
    except ValueError:
        return None
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        return None  # reading must not create an empty SQLite file
    return url if _initialized(url) else None


def _initialized(url: str) -> bool:
    """Whether Optuna has finished creating its tables in this storage.

    Optuna creates its schema when it first opens a storage; a page opening it while a study
    worker creates it would race the worker's own creation (and may make it fail), so a page
    reads only a storage whose schema version is already recorded.
    """
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table("alembic_version"):
                return False
            return connection.execute(text("SELECT COUNT(*) FROM alembic_version")).scalar() == 1
    except SQLAlchemyError:
        return False
    finally:
        engine.dispose()


def list_studies(database_url: str) -> list[StudySummary]:
    import optuna

    url = _storage(database_url)
    if url is None:
        return []
    try:
        summaries = optuna.get_all_study_summaries(storage=url)
    except Exception:  # an empty PostgreSQL schema has no Optuna tables yet
        return []
    return [
        StudySummary(name=s.study_name, trials=s.n_trials)
        for s in sorted(summaries, key=lambda s: s.study_name)
        if "@budget=" not in s.study_name  # probe stages show inside their study
    ]


def _readable(params: dict[str, Any]) -> dict[str, str]:
    return {k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in sorted(params.items())}


def _encodes_order(param: str) -> bool:
    # The permutation encodings' own parameters: the order column already shows what they mean.
    return "lehmer_" in param or "key_" in param or param.endswith("order")


def study_detail(database_url: str, name: str) -> StudyDetail:
    """A study's trials (order and hyperparameters readable), best-so-far and compute per site.

    Raises:
        NotFound: No study of that name.
    """
    import optuna

    from coordinator.console.study import trial_run_ids
    from ordering import OrderingStudy, StudyMismatch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = _storage(database_url)
    if url is None:
        raise NotFound(f"no study {name!r}")
    try:
        study = OrderingStudy.load(url, name)
    except (KeyError, StudyMismatch) as exc:
        raise NotFound(f"no study {name!r}") from exc
    links = trial_run_ids(study)
    history = study.history()
    trials = [
        TrialView(
            number=r.number,
            budget=r.budget_fraction,
            state=r.state,
            value=r.value,
            order=r.plan.describe() if r.plan is not None else "",
            hyperparameters=_readable({k: v for k, v in r.params.items() if not _encodes_order(k)}),
            compute_seconds=round(r.compute_seconds, 3),
            run_id=links.get((r.study_name, r.number)),
        )
        for r in history
    ]
    sign = 1.0 if study.direction == "maximize" else -1.0
    best_so_far: list[tuple[int, float]] = []
    best: float | None = None
    for record in history:
        value = record.value
        if record.budget_fraction != 1.0 or record.state != "COMPLETE" or value is None:
            continue
        if not math.isfinite(value):
            continue
        if best is None or sign * value > sign * best:
            best = value
        best_so_far.append((record.number, best))
    compute: dict[str, float] = {}
    for record in history:
        for site, seconds in record.cost_seconds_by_site.items():
            compute[site] = round(compute.get(site, 0.0) + seconds, 3)
    try:
        best_plan: str | None = study.best_plan().describe()
    except ValueError:
        best_plan = None
    importances: dict[str, float] = {}
    complete = [t for t in study.optuna_study.trials if t.state.name == "COMPLETE"]
    if len(complete) >= 3:
        try:
            found = optuna.importance.get_param_importances(study.optuna_study)
            importances = {k: round(float(v), 4) for k, v in found.items()}
        except (RuntimeError, ValueError):
            importances = {}
    return StudyDetail(
        name=name, direction=study.direction, trials=trials, best_so_far=best_so_far,
        best_plan=best_plan, compute_seconds_by_site=compute, importances=importances,
    )  # fmt: skip
