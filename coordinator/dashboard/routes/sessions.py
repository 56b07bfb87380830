"""Active login sessions of the dashboard's accounts, and their revocation (admins only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from coordinator.dashboard._deps import Admin, StateDep
from coordinator.dashboard._render import render
from coordinator.dashboard.schemas import RevokeSessionsRequest, SessionView

router = APIRouter(tags=["pages"])
api = APIRouter(tags=["sessions"])

AccountFilter = Annotated[str | None, Query(max_length=64)]


def _views(state: StateDep, account: str | None) -> list[SessionView]:
    return [
        SessionView(
            key=s.key, account=s.account, role=s.role, via=s.via, client=s.client,
            created_at=s.created_at, last_seen_at=s.last_seen_at, expires_at=s.expires_at,
        )
        for s in state.sessions.active(account or None)
    ]  # fmt: skip


@router.get("/sessions", response_class=HTMLResponse, include_in_schema=False)
def sessions_page(
    request: Request, state: StateDep, principal: Admin, account: AccountFilter = None
) -> HTMLResponse:
    own = principal.session.id if principal.session else ""
    own_key = state.sessions.key_of(own) if own else ""
    return render(request, "sessions.html", principal, sessions=_views(state, account),
                  account_filter=account or "", own_key=own_key)  # fmt: skip


@router.post("/sessions/revoke", include_in_schema=False)
def revoke_form(
    state: StateDep,
    principal: Admin,
    account: Annotated[str, Form(min_length=1, max_length=64)],
    session: Annotated[str, Form(max_length=16)] = "",
) -> Response:
    ended = state.sessions.revoke(account, session or None, by=principal.actor)
    if principal.session is not None and state.sessions.get(principal.session.id) is not None:
        principal.session.flash.append(f"{ended} session(s) of {account} ended")
    return RedirectResponse("/sessions", status_code=303)


@api.get("/sessions")
def sessions(state: StateDep, _: Admin, account: AccountFilter = None) -> list[SessionView]:
    """Sessions not yet expired (of one account, or all), most recently seen first."""
    return _views(state, account)


@api.post("/sessions/revoke")
def revoke(body: RevokeSessionsRequest, state: StateDep, principal: Admin) -> dict[str, int]:
    """Ends one session of an account (by its key) or all of them; the account logs in again."""
    return {"ended": state.sessions.revoke(body.account, body.session, by=principal.actor)}
