"""The dashboard's FastAPI application factory."""

from __future__ import annotations

from importlib.resources import files
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from coordinator.dashboard._accounts import AccountStore
from coordinator.dashboard._auth import SessionStore
from coordinator.dashboard._deps import CsrfRefused, DashboardState, Forbidden, LoginRequired
from coordinator.dashboard._render import render
from coordinator.dashboard._service import DashboardService
from coordinator.dashboard.routes import auth, ledger, overview, runs, sessions, sites, studies
from coordinator.engine import RunEngine
from coordinator.errors import CoordinatorError, NotFound
from coordinator.plan import PlanError
from coordinator.study_request import StudyRequestError
from coordinator.study_supervisor import StudySupervisor

__all__ = ["create_app"]

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Strict-Transport-Security": "max-age=31536000",
}


class _SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        for name, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        if request.url.path != "/static" and not request.url.path.startswith("/static/"):
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def create_app(
    engine: RunEngine,
    *,
    accounts: AccountStore | None = None,
    supervisor: StudySupervisor | None = None,
    stream_seconds: float = 600.0,
    stream_interval: float = 1.0,
) -> FastAPI:
    """Builds the dashboard over a run engine (and its ledger).

    Args:
        engine: The coordinator's run engine: every read goes through its ledger, every action
            through one of its methods.
        accounts: Account store (default: over the engine's ledger).
        supervisor: Starts and stops study workers (default: one without admin credentials,
            which refuses to start studies and says why).
        stream_seconds: How long one server-sent-event stream lasts before the browser
            reconnects.
        stream_interval: How often a live view checks for changes.
    """
    app = FastAPI(
        title="Baton dashboard",
        version="1",
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/v1/openapi.json",
    )
    package = files("coordinator.dashboard")
    templates = Jinja2Templates(directory=str(package / "templates"))
    app.state.dashboard = DashboardState(
        service=DashboardService(engine),
        accounts=accounts or AccountStore(engine.ledger),
        templates=templates,
        sessions=SessionStore(engine.ledger),
        supervisor=supervisor
        or StudySupervisor(
            engine.ledger,
            database_url=engine.ledger.url,
            credentials=None,
            log_dir=engine.runs_dir.parent / "study-workers",
        ),
        stream_seconds=stream_seconds,
        stream_interval=stream_interval,
    )
    app.add_middleware(_SecurityHeaders)
    app.mount("/static", StaticFiles(directory=str(package / "static")), name="static")
    for module in (auth, overview, runs, ledger, sites, studies, sessions):
        app.include_router(module.router)
        app.include_router(module.api, prefix="/api/v1")

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": str(exc)}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        if request.method != "GET":
            return HTMLResponse("log in first", status_code=401)
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return render(request, "error.html", None, status_code=403, message=str(exc))

    @app.exception_handler(CsrfRefused)
    async def _csrf(request: Request, exc: CsrfRefused) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": str(exc)}, status_code=403)
        return render(request, "error.html", None, status_code=403, message=str(exc))

    @app.exception_handler(CoordinatorError)
    async def _refused(request: Request, exc: CoordinatorError) -> Response:
        code = 404 if isinstance(exc, NotFound) else 409
        if _wants_json(request):
            return JSONResponse({"detail": str(exc)}, status_code=code)
        return render(request, "error.html", None, status_code=code, message=str(exc))

    @app.exception_handler(PlanError)
    async def _bad_plan(request: Request, exc: PlanError) -> Response:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(StudyRequestError)
    async def _bad_study(request: Request, exc: StudyRequestError) -> Response:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    return app
