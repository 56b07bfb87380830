"""Ordering studies: trials, best-so-far, compute per site; start a run from a study's best."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from coordinator.dashboard._deps import Operator, ServiceDep, Viewer
from coordinator.dashboard._plot import series_svg
from coordinator.dashboard._render import render
from coordinator.dashboard._studies import StudyDetail, StudySummary, list_studies, study_detail
from coordinator.dashboard.schemas import ActionResult
from coordinator.errors import CoordinatorError, InvalidInput, NotFound

router = APIRouter(tags=["pages"])
api = APIRouter(tags=["studies"])


@router.get("/studies", response_class=HTMLResponse, include_in_schema=False)
def studies_page(request: Request, service: ServiceDep, principal: Viewer) -> HTMLResponse:
    return render(request, "studies.html", principal, studies=list_studies(service.ledger.url))


@router.get("/studies/{name}", response_class=HTMLResponse, include_in_schema=False)
def study_page(request: Request, name: str, service: ServiceDep, principal: Viewer) -> HTMLResponse:
    detail = study_detail(service.ledger.url, name)
    curve = series_svg({"best so far": detail.best_so_far}, label="trial")
    return render(request, "study.html", principal, study=detail, curve=curve)


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
        if principal.session is not None:
            principal.session.flash.append(f"start refused: {exc}")
        return RedirectResponse(f"/studies/{name}", status_code=303)
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


@api.get("/studies")
def studies(service: ServiceDep, _: Viewer) -> list[StudySummary]:
    """The ordering studies kept beside this ledger."""
    return list_studies(service.ledger.url)


@api.get("/studies/{name}")
def study(name: str, service: ServiceDep, _: Viewer) -> StudyDetail:
    """A study's trials, best-so-far curve, parameter importances and compute per site."""
    return study_detail(service.ledger.url, name)


@api.post("/studies/{name}/start-best", status_code=201)
async def start_best(
    name: str, service: ServiceDep, principal: Operator, allow_offline: bool = False
) -> ActionResult:
    """Starts a run of the study's best plan (`allow_offline`: queue it for offline sites)."""
    run_id = await _start_best(service, name, principal.actor, allow_offline)
    return ActionResult(run_id=run_id, status="running", message=f"best plan of {name} started")
