"""Typed FastAPI dependencies: the dashboard's state, the caller and the role it needs."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates

from coordinator.dashboard._accounts import Account, AccountStore, DashboardRole
from coordinator.dashboard._auth import (
    SESSION_COOKIE,
    LoginThrottle,
    Session,
    SessionStore,
    csrf_matches,
)
from coordinator.dashboard._service import DashboardService
from coordinator.study_supervisor import StudySupervisor

__all__ = [
    "Admin",
    "CsrfRefused",
    "DashboardState",
    "Forbidden",
    "LoginRequired",
    "Operator",
    "Principal",
    "ServiceDep",
    "StateDep",
    "Viewer",
]

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


@dataclass
class DashboardState:
    """Everything the routes share; built by create_app, never at import time."""

    service: DashboardService
    accounts: AccountStore
    templates: Jinja2Templates
    sessions: SessionStore
    supervisor: StudySupervisor
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    stream_seconds: float = 600.0  # an SSE stream ends after this; EventSource reconnects
    stream_interval: float = 1.0


@dataclass(frozen=True)
class Principal:
    account: Account
    session: Session | None  # None when the caller came with an API token

    @property
    def actor(self) -> str:
        """How the ledger names this caller in the events its actions cause."""
        return f"dashboard:{self.account.name}"


class LoginRequired(Exception):
    """No valid session or token."""


class Forbidden(Exception):
    """Logged in, but the account's role does not allow this."""

    def __init__(self, needed: DashboardRole) -> None:
        super().__init__(f"this needs the {needed.label} role")


class CsrfRefused(Exception):
    """A state-changing request with a session cookie but without its CSRF token."""


def get_state(request: Request) -> DashboardState:
    state: DashboardState = request.app.state.dashboard
    return state


StateDep = Annotated[DashboardState, Depends(get_state)]


def get_service(state: StateDep) -> DashboardService:
    return state.service


ServiceDep = Annotated[DashboardService, Depends(get_service)]


async def current_principal(request: Request, state: StateDep) -> Principal:
    """The caller, from a Bearer API token or a session cookie (CSRF-checked when it writes)."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        account = state.accounts.account_for_token(header[7:].strip())
        if account is None:
            raise LoginRequired("unknown or expired API token")
        return Principal(account, None)
    session = state.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
    if session is None:
        raise LoginRequired("log in first")
    if request.method not in SAFE_METHODS:
        given = request.headers.get("x-csrf-token")
        if given is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")
        ):
            value = (await request.form()).get("csrf_token")
            given = value if isinstance(value, str) else None
        if not csrf_matches(session.csrf_token, given):
            raise CsrfRefused("missing or wrong CSRF token: reload the page and try again")
    return Principal(session.account, session)


def require(role: DashboardRole) -> Callable[..., Coroutine[Any, Any, Principal]]:
    async def dependency(
        principal: Annotated[Principal, Depends(current_principal)],
    ) -> Principal:
        if principal.account.role < role:
            raise Forbidden(role)
        return principal

    return dependency


Viewer = Annotated[Principal, Depends(require(DashboardRole.VIEWER))]
Operator = Annotated[Principal, Depends(require(DashboardRole.OPERATOR))]
Admin = Annotated[Principal, Depends(require(DashboardRole.ADMIN))]
