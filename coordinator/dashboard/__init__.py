"""The admin dashboard: server-rendered pages and a JSON API over the coordinator's run engine."""

from coordinator.dashboard._accounts import Account, AccountError, AccountStore, DashboardRole
from coordinator.dashboard._app import create_app
from coordinator.dashboard._auth import SessionInfo, SessionStore
from coordinator.dashboard._serve import DashboardServer, start_dashboard

__all__ = [
    "Account",
    "AccountError",
    "AccountStore",
    "DashboardRole",
    "DashboardServer",
    "SessionInfo",
    "SessionStore",
    "create_app",
    "start_dashboard",
]
