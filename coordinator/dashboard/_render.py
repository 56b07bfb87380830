"""Renders a page with the caller's account, CSRF token and pending messages; redirects after
a form's action with the message to show next."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse

from coordinator.dashboard._deps import DashboardState, Principal

__all__ = ["redirect", "render"]


def render(
    request: Request,
    template: str,
    principal: Principal | None,
    *,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    state: DashboardState = request.app.state.dashboard
    session = principal.session if principal else None
    flash = session.flash if session else []
    response = state.templates.TemplateResponse(
        request,
        template,
        {
            "account": principal.account if principal else None,
            "csrf_token": session.csrf_token if session else "",
            "flash": list(flash),
            **context,
        },
        status_code=status_code,
    )
    flash.clear()
    return response


def redirect(url: str, principal: Principal, message: str) -> RedirectResponse:
    """Where a form's action goes next (303 See Other), with ``message`` shown on that page."""
    if principal.session is not None:  # an API token's caller sees no page
        principal.session.flash.append(message)
    return RedirectResponse(url, status_code=303)
