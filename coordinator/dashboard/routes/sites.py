"""Sites: connection, agent version, certificates and their revocation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, Response

from coordinator.dashboard._deps import Admin, ServiceDep, Viewer
from coordinator.dashboard._render import redirect, render
from coordinator.dashboard.schemas import ActionResult, RevokeRequest, SiteView
from coordinator.errors import CoordinatorError

router = APIRouter(tags=["pages"])
api = APIRouter(tags=["sites"])


@router.get("/sites", response_class=HTMLResponse, include_in_schema=False)
def sites_page(request: Request, service: ServiceDep, principal: Viewer) -> HTMLResponse:
    return render(request, "sites.html", principal, sites=service.sites())


@router.post("/sites/revoke", include_in_schema=False)
async def revoke_form(
    service: ServiceDep,
    principal: Admin,
    serial: Annotated[str, Form(max_length=64)],
    reason: Annotated[str, Form(max_length=500)] = "revoked from the dashboard",
) -> Response:
    try:
        closed = await service.revoke(serial, reason, by=principal.actor)
        message = f"certificate {serial} revoked; {closed} stream(s) closed"
    except CoordinatorError as exc:
        message = f"revocation refused: {exc}"
    return redirect("/sites", principal, message)


@api.get("/sites")
def sites(service: ServiceDep, _: Viewer) -> list[SiteView]:
    """Every site that ever registered, whether it is online, and its certificate."""
    return service.sites()


@api.post("/certificates/revoke")
async def revoke(body: RevokeRequest, service: ServiceDep, principal: Admin) -> ActionResult:
    """Revokes a certificate serial (hex) and closes the streams opened with it."""
    closed = await service.revoke(body.serial, body.reason, by=principal.actor)
    return ActionResult(status="revoked", message=f"{closed} stream(s) closed")
