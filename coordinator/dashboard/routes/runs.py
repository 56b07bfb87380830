"""Runs: the list, a run's live hop timeline and curves, its checkpoints, and run actions."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sse_starlette import EventSourceResponse

from coordinator.dashboard._deps import Operator, Principal, ServiceDep, StateDep, Viewer
from coordinator.dashboard._live import live_fragment
from coordinator.dashboard._plot import curve_metrics, validation_svg
from coordinator.dashboard._render import redirect, render
from coordinator.dashboard._service import DashboardService
from coordinator.dashboard.schemas import (
    ActionResult,
    EvaluateRequest,
    RunDetail,
    RunPage,
    StartRunRequest,
)
from coordinator.errors import CoordinatorError
from coordinator.ledger import TERMINAL_RUN_STATES
from coordinator.plan import PlanError

router = APIRouter(tags=["pages"])
api = APIRouter(tags=["runs"])

Action = Literal["pause", "resume", "retry", "skip", "abort"]
Limit = Annotated[int, Query(ge=1, le=200)]
Offset = Annotated[int, Query(ge=0, le=10_000_000)]
RunStatusFilter = Annotated[str | None, Query(max_length=16)]


def _curves(detail: RunDetail) -> list[tuple[str, str]]:
    return [(name, validation_svg(detail.hops, name)) for name in curve_metrics(detail.hops)]


async def _act(
    service: DashboardService, principal: Principal, run_id: str, action: Action, reason: str
) -> str:
    by = principal.actor
    if action == "pause":
        await service.pause(run_id, by=by)
        return "paused: the hop in flight is redone on resume"
    if action in ("resume", "retry"):
        await service.resume(run_id, by=by)
        return "resumed"
    if action == "skip":
        await service.skip(run_id, by=by)
        return "failed hop skipped; run resumed"
    await service.abort(run_id, reason, by=by)
    return "aborted"


# ---- pages ---------------------------------------------------------------------------------------


@router.get("/runs", response_class=HTMLResponse, include_in_schema=False)
def runs_page(
    request: Request,
    service: ServiceDep,
    principal: Viewer,
    limit: Limit = 25,
    offset: Offset = 0,
    status: RunStatusFilter = None,
) -> HTMLResponse:
    page = service.runs(limit=limit, offset=offset, status=status or None)
    return render(request, "runs.html", principal, page=page, status=status or "")


@router.get("/runs/new", response_class=HTMLResponse, include_in_schema=False)
def new_run_page(request: Request, principal: Operator) -> HTMLResponse:
    return render(request, "new_run.html", principal, plan="", error="")


@router.post("/runs", include_in_schema=False)
async def start_run_form(
    request: Request,
    service: ServiceDep,
    principal: Operator,
    plan: Annotated[str, Form(max_length=200_000)],
    allow_offline: Annotated[bool, Form()] = False,
) -> Response:
    try:
        run_id = await service.start_run(plan, by=principal.actor, allow_offline=allow_offline)
    except (PlanError, CoordinatorError) as exc:
        return render(request, "new_run.html", principal, status_code=422, plan=plan,
                      error=str(exc))  # fmt: skip
    return RedirectResponse(f"/runs/{run_id}", status_code=303)


@router.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False)
def run_page(request: Request, run_id: str, service: ServiceDep, principal: Viewer) -> HTMLResponse:
    detail = service.run_detail(run_id)
    return render(request, "run.html", principal, run=detail, curves=_curves(detail))


@router.get("/runs/{run_id}/stream", include_in_schema=False)
def run_stream(
    request: Request, run_id: str, state: StateDep, principal: Viewer
) -> EventSourceResponse:
    """The run's live part (holder, hop timeline, curves), re-sent whenever it changes."""
    state.service.run_detail(run_id)  # 404 before the stream starts
    finished: list[bool] = [False]

    def fragment() -> str:
        detail = state.service.run_detail(run_id)
        finished[0] = detail.status in TERMINAL_RUN_STATES
        template = state.templates.get_template("_run_live.html")
        return template.render(run=detail, curves=_curves(detail))

    return live_fragment(request, state, fragment, done=lambda: finished[0])


@router.post("/runs/{run_id}/evaluations", include_in_schema=False)
async def evaluate_form(
    run_id: str,
    service: ServiceDep,
    principal: Operator,
    split: Annotated[Literal["validation", "test"], Form()] = "validation",
) -> Response:
    try:
        ids = await service.evaluate(run_id, split, [], by=principal.actor)
        message = f"{len(ids)} {split} evaluation(s) requested"
    except CoordinatorError as exc:
        message = f"evaluation refused: {exc}"
    return redirect(f"/runs/{run_id}", principal, message)


@router.post("/runs/{run_id}/{action}", include_in_schema=False)
async def run_action_form(
    run_id: str,
    action: Action,
    service: ServiceDep,
    principal: Operator,
    reason: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    try:
        message = await _act(service, principal, run_id, action, reason)
    except CoordinatorError as exc:
        message = f"{action} refused: {exc}"
    return redirect(f"/runs/{run_id}", principal, message)


@router.get("/runs/{run_id}/adapter.zip", include_in_schema=False)
async def adapter_download(run_id: str, service: ServiceDep, _: Operator) -> Response:
    return await _adapter(run_id, service)


async def _adapter(run_id: str, service: DashboardService) -> Response:
    data = await asyncio.to_thread(service.adapter_zip, run_id)
    return Response(
        data,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="baton-{run_id}-adapter.zip"'},
    )


# ---- JSON API ------------------------------------------------------------------------------------


@api.get("/runs")
def list_runs(
    service: ServiceDep, _: Viewer, limit: Limit = 25, offset: Offset = 0,
    status: RunStatusFilter = None,
) -> RunPage:  # fmt: skip
    """Runs, newest first, one page at a time."""
    return service.runs(limit=limit, offset=offset, status=status or None)


@api.post("/runs", status_code=201)
async def start_run(
    body: StartRunRequest, service: ServiceDep, principal: Operator
) -> ActionResult:
    """Starts a run from a plan given as TOML or JSON text."""
    run_id = await service.start_run(
        body.plan, by=principal.actor, allow_offline=body.allow_offline
    )
    return ActionResult(run_id=run_id, status="running", message="run started")


@api.get("/runs/{run_id}")
def get_run(run_id: str, service: ServiceDep, _: Viewer) -> RunDetail:
    """A run with its hop timeline, evaluations and checkpoints."""
    return service.run_detail(run_id)


@api.post("/runs/{run_id}/evaluations")
async def evaluate_run(
    run_id: str, body: EvaluateRequest, service: ServiceDep, principal: Operator
) -> ActionResult:
    """Asks the sites to score the run's final adapter."""
    ids = await service.evaluate(run_id, body.split, body.sites, by=principal.actor)
    return ActionResult(run_id=run_id, status="requested", message=", ".join(ids))


@api.post("/runs/{run_id}/{action}")
async def run_action(
    run_id: str, action: Action, service: ServiceDep, principal: Operator, reason: str = ""
) -> ActionResult:
    """pause, resume, retry (the failed hop), skip (the failed hop) or abort a run."""
    message = await _act(service, principal, run_id, action, reason)
    return ActionResult(run_id=run_id, status=service.run_detail(run_id).status, message=message)


@api.get("/runs/{run_id}/adapter.zip", response_class=Response)
async def get_adapter(run_id: str, service: ServiceDep, _: Operator) -> Response:
    """The final adapter as a PEFT folder in a zip archive."""
    return await _adapter(run_id, service)
