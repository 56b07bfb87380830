"""The overview: sites online/offline, certificates, active runs and studies."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sse_starlette import EventSourceResponse

from coordinator.dashboard._deps import DashboardState, StateDep, Viewer
from coordinator.dashboard._live import live_fragment
from coordinator.dashboard._render import render
from coordinator.dashboard.schemas import ActiveStudy, Overview

router = APIRouter(tags=["pages"])
api = APIRouter(tags=["overview"])


def _overview(state: DashboardState) -> Overview:
    studies = [
        ActiveStudy(
            name=w.study,
            status=w.status,
            pid=w.pid,
            started_by=w.started_by,
            started_at=w.started_at,
        )
        for w in state.supervisor.workers(limit=50)
        if w.alive
    ]
    return state.service.overview(studies)


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def overview_page(request: Request, state: StateDep, principal: Viewer) -> HTMLResponse:
    return render(request, "overview.html", principal, overview=_overview(state))


@router.get("/overview/stream", include_in_schema=False)
def overview_stream(request: Request, state: StateDep, _: Viewer) -> EventSourceResponse:
    def fragment() -> str:
        template = state.templates.get_template("_overview_body.html")
        return template.render(overview=_overview(state))

    return live_fragment(request, state, fragment)


@api.get("/overview")
def overview(state: StateDep, _: Viewer) -> Overview:
    """Sites (online, certificates, approvals), the runs in progress and the running studies."""
    return _overview(state)
