"""Ordering studies: trials, best-so-far, compute per site; start and stop a study's worker,
start a run from a study's best."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from coordinator.dashboard._deps import Operator, ServiceDep, StateDep, Viewer
from coordinator.dashboard._plot import series_svg
from coordinator.dashboard._render import redirect, render
from coordinator.dashboard._studies import StudyDetail, StudySummary, list_studies, study_detail
from coordinator.dashboard.schemas import ActionResult, StopStudyRequest, StudyWorkerView
from coordinator.errors import CoordinatorError, InvalidInput, NotFound
from coordinator.study_request import (
    StopMode,
    StudyRequest,
    StudyRequestError,
    parse_study_document,
    prepare_search,
)
from coordinator.study_supervisor import StudySupervisor, StudyWorker

router = APIRouter(tags=["pages"])
api = APIRouter(tags=["studies"])


EXAMPLE_STUDY = """name = "heart-order"
dataset = "heart"
task = "tabular"
labels = ["0", "1"]
sites = ["site-a", "site-b", "site-c"]
trials = 6
cycles = 1
lr-min = 0.01
lr-max = 0.1
steps-min = 5
steps-max = 20
batch-size = 8
metric = "accuracy"
options = { model = "logistic" }
"""


def _worker_view(worker: StudyWorker) -> StudyWorkerView:
    return StudyWorkerView.model_validate(worker, from_attributes=True)


def _summaries(service: ServiceDep, supervisor: StudySupervisor) -> list[StudySummary]:
    """The stored studies, and those a worker is starting that have no trial stored yet."""
    stored = list_studies(service.ledger.url)
    names = {s.name for s in stored}
    starting = {w.study for w in supervisor.workers(limit=200) if w.alive} - names
    return sorted(stored + [StudySummary(name=n, trials=0) for n in starting],
                  key=lambda s: s.name)  # fmt: skip


@router.get("/studies", response_class=HTMLResponse, include_in_schema=False)
def studies_page(request: Request, state: StateDep, principal: Viewer) -> HTMLResponse:
    summaries = _summaries(state.service, state.supervisor)
    running = {w.study: w for w in state.supervisor.workers(limit=200) if w.alive}
    return render(request, "studies.html", principal, studies=summaries, running=running)


@router.get("/studies/new", response_class=HTMLResponse, include_in_schema=False)
def new_study_page(request: Request, state: StateDep, principal: Operator) -> HTMLResponse:
    return render(request, "new_study.html", principal, study=EXAMPLE_STUDY, error="",
                  refusal=state.supervisor.refusal())  # fmt: skip


async def _start_study(
    state: StateDep, request: StudyRequest, by: str, allow_offline: bool
) -> StudyWorker:
    """Checks a study as `baton study start` does, preflights its runs, starts its worker."""
    refusal = state.supervisor.refusal()
    if refusal is not None:
        raise InvalidInput(refusal)
    prepared = await run_in_threadpool(prepare_search, request)
    state.service.engine.preflight(prepared.first_plan, allow_offline=allow_offline)
    views = state.service.engine.site_views()
    refusals = prepared.approval_refusals({name: view.approvals for name, view in views.items()})
    if refusals:
        raise InvalidInput("the study offers runs its sites would refuse:\n" + "\n".join(refusals))
    return await run_in_threadpool(state.supervisor.start, request, by=by)


@router.post("/studies", include_in_schema=False)
async def start_study_form(
    request: Request,
    state: StateDep,
    principal: Operator,
    study: Annotated[str, Form(max_length=100_000)],
    allow_offline: Annotated[bool, Form()] = False,
) -> Response:
    try:
        worker = await _start_study(state, parse_study_document(study), principal.actor,
                                    allow_offline)  # fmt: skip
    except (StudyRequestError, CoordinatorError) as exc:
        return render(request, "new_study.html", principal, status_code=422, study=study,
                      error=str(exc), refusal=state.supervisor.refusal())  # fmt: skip
    return redirect(
        f"/studies/{worker.study}",
        principal,
        f"study {worker.study} started (worker pid {worker.pid}): the sites must have "
        "approved its bundle",
    )


@router.post("/studies/{name}/stop", include_in_schema=False)
async def stop_study_form(
    name: str,
    state: StateDep,
    principal: Operator,
    mode: Annotated[StopMode, Form()] = StopMode.FINISH_TRIAL,
) -> Response:
    try:
        await run_in_threadpool(state.supervisor.stop, name, mode, by=principal.actor)
        message = (
            f"study {name} stops after its current trial"
            if mode is StopMode.FINISH_TRIAL
            else f"study {name} stops now: its current trial's run is aborted"
        )
    except CoordinatorError as exc:
        message = f"stop refused: {exc}"
    return redirect(f"/studies/{name}", principal, message)


@router.get("/studies/{name}", response_class=HTMLResponse, include_in_schema=False)
def study_page(request: Request, name: str, state: StateDep, principal: Viewer) -> HTMLResponse:
    workers = state.supervisor.workers(name, limit=10)
    try:
        detail: StudyDetail | None = study_detail(state.service.ledger.url, name)
    except NotFound:
        if not workers:
            raise
        detail = None  # its worker has not stored the study yet
    curve = series_svg({"best so far": detail.best_so_far}, label="trial") if detail else ""
    return render(request, "study.html", principal, name=name, study=detail, curve=curve,
                  workers=workers, active=next((w for w in workers if w.alive), None))  # fmt: skip


async def _start_best(service: ServiceDep, name: str, by: str, allow_offline: bool = False) -> str:
    from coordinator.console.study import plan_from_study, study_storage_url
    from ordering import StudyMismatch

    try:
        url = study_storage_url(service.ledger.url, create_schema=False)
        plan = await run_in_threadpool(plan_from_study, url, name)
    except KeyError:
        raise NotFound(f"no study {name!r}") from None
    except (ValueError, StudyMismatch) as exc:
        raise InvalidInput(str(exc)) from exc
    service.engine.preflight(plan, allow_offline=allow_offline)
    return await service.engine.start_run(plan, by=by)


@router.post("/studies/{name}/start-best", include_in_schema=False)
async def start_best_form(
    name: str,
    service: ServiceDep,
    principal: Operator,
    allow_offline: Annotated[bool, Form()] = False,
) -> Response:
    try:
        run_id = await _start_best(service, name, principal.actor, allow_offline)
    except CoordinatorError as exc:
        return redirect(f"/studies/{name}", principal, f"start refused: {exc}")
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


@api.get("/studies")
def studies(state: StateDep, _: Viewer) -> list[StudySummary]:
    """The ordering studies kept beside this ledger (and those whose worker is starting)."""
    return _summaries(state.service, state.supervisor)


@api.post("/studies", status_code=201)
async def start_study(
    body: StudyRequest, state: StateDep, principal: Operator, allow_offline: bool = False
) -> StudyWorkerView:
    """Starts a study worker (`baton study start` with these options) after the CLI's checks
    and the runs' preflight (`allow_offline`: do not refuse offline sites)."""
    return _worker_view(await _start_study(state, body, principal.actor, allow_offline))


@api.get("/studies/{name}")
def study(name: str, service: ServiceDep, _: Viewer) -> StudyDetail:
    """A study's trials, best-so-far curve, parameter importances and compute per site."""
    return study_detail(service.ledger.url, name)


@api.get("/studies/{name}/workers")
def study_workers(
    name: str, state: StateDep, _: Viewer, limit: Annotated[int, Query(ge=1, le=200)] = 20
) -> list[StudyWorkerView]:
    """The study's workers (started from the dashboard), newest first."""
    return [_worker_view(w) for w in state.supervisor.workers(name, limit=limit)]


@api.post("/studies/{name}/stop")
async def stop_study(
    name: str, body: StopStudyRequest, state: StateDep, principal: Operator
) -> StudyWorkerView:
    """Stops the study's worker: after its current trial (`finish-trial`) or at once, aborting
    the current trial's run (`abort-trial`)."""
    worker = await run_in_threadpool(state.supervisor.stop, name, body.mode, by=principal.actor)
    return _worker_view(worker)


@api.post("/studies/{name}/start-best", status_code=201)
async def start_best(
    name: str, service: ServiceDep, principal: Operator, allow_offline: bool = False
) -> ActionResult:
    """Starts a run of the study's best plan (`allow_offline`: queue it for offline sites)."""
    run_id = await _start_best(service, name, principal.actor, allow_offline)
    return ActionResult(run_id=run_id, status="running", message=f"best plan of {name} started")
