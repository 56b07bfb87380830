"""Logging in (password or one-time link), logging out, and who am I."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel

from coordinator.dashboard._accounts import Account, DashboardRole
from coordinator.dashboard._auth import LOGIN_CSRF_COOKIE, SESSION_COOKIE, csrf_matches
from coordinator.dashboard._deps import StateDep, Viewer
from coordinator.dashboard._render import render
from protocols.pki import PeerIdentity, PkiError, Role, identity_from_pem

router = APIRouter(tags=["pages"])
api = APIRouter(tags=["account"])


class Me(BaseModel):
    account: str
    role: str


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _safe_next(target: str) -> str:
    # Only paths on this dashboard: never an open redirect to another host.
    return target if target.startswith("/") and not target.startswith("//") else "/"


def _start_session(
    state: StateDep, request: Request, name: str, target: str, *, via: str
) -> Response:
    account = state.accounts.get(name)
    assert account is not None
    return _session_response(state, request, account, target, via=via)


def _session_response(
    state: StateDep, request: Request, account: Account, target: str, *, via: str
) -> Response:
    session = state.sessions.create(account, via=via, client=_client(request))
    response = RedirectResponse(_safe_next(target), status_code=303)
    response.set_cookie(SESSION_COOKIE, session.id, httponly=True, secure=True,
                        samesite="strict", path="/")  # fmt: skip
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return response


@router.get("/login", include_in_schema=False)
def login_page(request: Request, next: str = "/", error: str = "") -> Response:
    token = secrets.token_urlsafe(32)
    response = render(request, "login.html", None, next=_safe_next(next), login_csrf=token,
                      error=error)  # fmt: skip
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, secure=True,
                        samesite="strict", path="/login")  # fmt: skip
    return response


@router.post("/login", include_in_schema=False)
def login(
    request: Request,
    state: StateDep,
    name: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form(max_length=128)] = "",
    next: Annotated[str, Form(max_length=500)] = "/",
) -> Response:
    """Password login: throttled per account and per client address; failures are ledgered."""
    client = _client(request)
    if not csrf_matches(request.cookies.get(LOGIN_CSRF_COOKIE, ""), csrf_token):
        return render(request, "login.html", None, status_code=403, next=_safe_next(next),
                      login_csrf="", error="the login form expired: reload the page")  # fmt: skip
    wait = state.throttle.retry_after(name, client)
    if wait > 0:
        minutes = int(wait // 60) + 1
        error = f"too many failed logins: try again in {minutes} minute(s)"
        response = render(request, "login.html", None, status_code=429, next=_safe_next(next),
                          login_csrf=csrf_token, error=error)  # fmt: skip
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    account = state.accounts.authenticate(name, password)
    if account is None:
        state.throttle.failed(name, client)
        state.service.ledger.record_event(
            "dashboard.login-failed", payload={"account": name, "client": client}
        )
        return render(request, "login.html", None, status_code=401, next=_safe_next(next),
                      login_csrf=csrf_token, error="wrong account name or password")  # fmt: skip
    state.throttle.succeeded(name)
    return _start_session(state, request, account.name, next, via="password")


@router.get("/login/link", include_in_schema=False)
def login_link(request: Request, state: StateDep, token: str = "") -> Response:
    """A one-time login link (printed by `baton demo` or `baton admin login-link`)."""
    client = _client(request)
    wait = state.throttle.retry_after("", client)
    if wait > 0:
        error = "too many failed logins from this address: try again later"
        response = render(request, "login.html", None, status_code=429, next="/", login_csrf="",
                          error=error)  # fmt: skip
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    account = state.accounts.account_for_token(token, kind="login") if token else None
    if account is None:
        state.throttle.failed("", client)
        state.service.ledger.record_event(
            "dashboard.login-failed",
            payload={"account": None, "client": client, "reason": "login link"},
        )
        return render(request, "login.html", None, status_code=401, next="/", login_csrf="",
                      error="this login link is invalid, expired or used already")  # fmt: skip
    return _start_session(state, request, account.name, "/", via="link")


def _admin_identity(state: StateDep, pem: str | None) -> tuple[PeerIdentity | None, str]:
    """The admin a client certificate names, or None and why it cannot log in."""
    if not pem:
        return None, "your browser presented no certificate of this consortium"
    try:
        identity = identity_from_pem(pem.encode())
    except PkiError as exc:
        return None, str(exc)
    if identity.role != Role.ADMIN:
        return None, f"a {identity.role} certificate cannot log in here"
    if state.service.engine.revocation(identity.serial):
        return None, "this certificate is revoked"
    return identity, ""


@router.get("/login/certificate", include_in_schema=False)
def login_certificate(request: Request, state: StateDep) -> Response:
    """Login by an admin client certificate (`baton pki issue admin`) shown in the handshake."""
    chain = request.scope.get("extensions", {}).get("tls", {}).get("client_cert_chain") or []
    client = _client(request)
    if state.throttle.retry_after("", client) > 0:
        error = "too many failed logins from this address: try again later"
        return render(request, "login.html", None, status_code=429, next="/", login_csrf="",
                      error=error)  # fmt: skip
    identity, refusal = _admin_identity(state, chain[0] if chain else None)
    if identity is not None:
        state.service.ledger.record_event(
            "dashboard.certificate-login",
            payload={"account": identity.name, "serial": format(identity.serial, "x"),
                     "client": client},
        )  # fmt: skip
        return _session_response(
            state, request, Account(identity.name, DashboardRole.ADMIN), "/", via="certificate"
        )
    state.throttle.failed("", client)
    state.service.ledger.record_event(
        "dashboard.login-failed",
        payload={"account": None, "client": client, "reason": f"certificate: {refusal}"},
    )
    return render(request, "login.html", None, status_code=401, next="/", login_csrf="",
                  error=f"certificate login refused: {refusal}")  # fmt: skip


@router.post("/logout", include_in_schema=False)
def logout(state: StateDep, principal: Viewer) -> Response:
    if principal.session is not None:
        state.sessions.end(principal.session.id)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@api.get("/me")
def me(principal: Viewer) -> Me:
    """The calling account and its role."""
    return Me(account=principal.account.name, role=principal.account.role.label)
