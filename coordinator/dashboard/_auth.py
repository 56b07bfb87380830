"""Sessions, CSRF tokens and the failed-login throttle of the dashboard (in memory)."""

from __future__ import annotations

import hmac
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

from coordinator.dashboard._accounts import Account

__all__ = ["LoginThrottle", "Session", "SessionStore", "csrf_matches"]

SESSION_COOKIE = "baton_session"
LOGIN_CSRF_COOKIE = "baton_login_csrf"


@dataclass
class Session:
    id: str
    account: Account
    csrf_token: str
    expires_at: float
    flash: list[str] = field(default_factory=list)  # messages for the next page shown


@dataclass
class SessionStore:
    """Server-side sessions: the cookie holds only a random id; logout really ends a session."""

    lifetime_seconds: float = 12 * 3600
    _sessions: dict[str, Session] = field(default_factory=dict)

    def create(self, account: Account) -> Session:
        self._expire()
        session = Session(
            id=secrets.token_urlsafe(32),
            account=account,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=time.monotonic() + self.lifetime_seconds,
        )
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is None or session.expires_at < time.monotonic():
            self._sessions.pop(session_id, None)
            return None
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._sessions.items() if s.expires_at < now]:
            del self._sessions[key]


def csrf_matches(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), (given or "").encode())


@dataclass
class LoginThrottle:
    """Refuses logins for an account or a client address after too many recent failures."""

    max_per_account: int = 5
    max_per_client: int = 20
    window_seconds: float = 15 * 60
    _failures: dict[str, deque[float]] = field(default_factory=dict)

    def _recent(self, key: str) -> deque[float]:
        stamps = self._failures.setdefault(key, deque())
        cutoff = time.monotonic() - self.window_seconds
        while stamps and stamps[0] < cutoff:
            stamps.popleft()
        return stamps

    def retry_after(self, account: str, client: str) -> float:
        """Seconds until a login may be tried again (0: now)."""
        waits = []
        for key, limit in ((f"a:{account}", self.max_per_account),
                           (f"c:{client}", self.max_per_client)):  # fmt: skip
            stamps = self._recent(key)
            if len(stamps) >= limit:
                waits.append(stamps[0] + self.window_seconds - time.monotonic())
        return max(waits, default=0.0)

    def failed(self, account: str, client: str) -> None:
        now = time.monotonic()
        self._recent(f"a:{account}").append(now)
        self._recent(f"c:{client}").append(now)

    def succeeded(self, account: str) -> None:
        self._failures.pop(f"a:{account}", None)
