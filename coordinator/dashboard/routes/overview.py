"""The overview: sites online/offline, certificates, active runs."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from sse_starlette import EventSourceResponse

from coordinator.dashboard._deps import ServiceDep, StateDep, Viewer
from coordinator.dashboard._live import live_fragment
from coordinator.dashboard._render import render
from coordinator.dashboard.schemas import Overview

router = APIRouter(tags=["pages"])
api = APIRouter(tags=["overview"])


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def overview_page(request: Request, service: ServiceDep, principal: Viewer) -> HTMLResponse:
    return render(request, "overview.html", principal, overview=service.overview())


@router.get("/overview/stream", include_in_schema=False)
def overview_stream(request: Request, state: StateDep, _: Viewer) -> EventSourceResponse:
    def fragment() -> str:
        template = state.templates.get_template("_overview_body.html")
        return template.render(overview=state.service.overview())

    return live_fragment(request, state, fragment)


@api.get("/overview")
def overview(service: ServiceDep, _: Viewer) -> Overview:
    """Sites (online, certificates) and the runs in progress."""
    return service.overview()
