"""Sessions (in the ledger's database), CSRF tokens and the failed-login throttle (in memory)."""

from __future__ import annotations

import hmac
import re
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, select

from coordinator.dashboard._accounts import Account, DashboardRole, _aware, _digest, _now
from coordinator.ledger import DashboardSessionRow, Ledger, locked_get

__all__ = ["LoginThrottle", "Session", "SessionInfo", "SessionStore", "csrf_matches"]

SESSION_COOKIE = "baton_session"
LOGIN_CSRF_COOKIE = "baton_login_csrf"


@dataclass
class Session:
    id: str  # the cookie's token; the database holds only its SHA-256
    account: Account
    csrf_token: str
    expires_at: datetime
    flash: list[str] = field(default_factory=list)  # messages for the next page shown


@dataclass(frozen=True)
class SessionInfo:
    """An active session as an admin sees it (never its token)."""

    key: str  # the first 16 hex digits of the token's SHA-256: names it for revocation
    account: str
    role: str
    via: str
    client: str
    created_at: datetime
    last_seen_at: datetime
    expires_at: datetime


class SessionStore:
    """Server-side sessions kept in the ledger's database, so a coordinator restart keeps them.

    The cookie holds a random token; the database only its SHA-256, so reading the database
    does not give away a session. Logout and revocation delete the row.
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        lifetime: timedelta = timedelta(hours=12),
        touch_every: timedelta = timedelta(seconds=60),
    ) -> None:
        self.ledger = ledger
        self.lifetime = lifetime
        self.touch_every = touch_every  # last_seen is written at most this often per session
        self._flash: dict[str, list[str]] = {}  # by token digest; messages do not need to persist

    def create(self, account: Account, *, via: str, client: str) -> Session:
        token = secrets.token_urlsafe(32)
        now = _now()
        session = Session(
            id=token,
            account=account,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=now + self.lifetime,
        )
        with self.ledger.transaction() as db:
            db.execute(delete(DashboardSessionRow).where(DashboardSessionRow.expires_at < now))
            db.add(
                DashboardSessionRow(
                    token_sha256=_digest(token), account=account.name, role=account.role.label,
                    via=via, csrf_token=session.csrf_token, client=client[:64], created_at=now,
                    expires_at=session.expires_at, last_seen_at=now,
                )
            )  # fmt: skip
        return session

    def get(self, token: str) -> Session | None:
        if not token:
            return None
        digest = _digest(token)
        now = _now()
        with self.ledger.transaction() as db:
            row = db.get(DashboardSessionRow, digest)
            if row is None:
                return None
            if not self._writes(row, now):
                return self._session(token, digest, row)
        # Expired or due a touch: read again under the lock, so a logout or revocation
        # committed meanwhile is seen (not updated or deleted a second time).
        with self.ledger.transaction() as db:
            row = locked_get(db, DashboardSessionRow, digest)
            if row is None:
                self._flash.pop(digest, None)
                return None
            if _aware(row.expires_at) < now:
                db.delete(row)
                self._flash.pop(digest, None)
                return None
            if self._writes(row, now):
                row.last_seen_at = now
            return self._session(token, digest, row)

    def _writes(self, row: DashboardSessionRow, now: datetime) -> bool:
        """Whether reading the session writes its row: deleted (expired) or touched."""
        expired = _aware(row.expires_at) < now
        return expired or now - _aware(row.last_seen_at) >= self.touch_every

    def _session(self, token: str, digest: str, row: DashboardSessionRow) -> Session:
        account = Account(row.account, DashboardRole.parse(row.role))
        return Session(token, account, row.csrf_token, _aware(row.expires_at),
                       self._flash.setdefault(digest, []))  # fmt: skip

    def end(self, token: str) -> None:
        digest = _digest(token)
        self._flash.pop(digest, None)
        with self.ledger.transaction() as db:
            db.execute(
                delete(DashboardSessionRow).where(DashboardSessionRow.token_sha256 == digest)
            )

    def active(self, account: str | None = None) -> list[SessionInfo]:
        """Sessions not yet expired (of one account, or all), most recently seen first."""
        query = select(DashboardSessionRow).where(DashboardSessionRow.expires_at >= _now())
        if account is not None:
            query = query.where(DashboardSessionRow.account == account)
        with self.ledger.transaction() as db:
            rows = db.scalars(query.order_by(DashboardSessionRow.last_seen_at.desc()).limit(500))
            return [
                SessionInfo(
                    key=row.token_sha256[:16], account=row.account, role=row.role, via=row.via,
                    client=row.client, created_at=_aware(row.created_at),
                    last_seen_at=_aware(row.last_seen_at), expires_at=_aware(row.expires_at),
                )
                for row in rows
            ]  # fmt: skip

    @staticmethod
    def key_of(token: str) -> str:
        """The key an admin sees for a session (see `SessionInfo.key`)."""
        return _digest(token)[:16]

    def revoke(self, account: str, key: str | None, *, by: str) -> int:
        """Ends one session of an account (by its key) or all of them (`key` None), ledgered.

        Returns:
            How many sessions ended.
        """
        query = delete(DashboardSessionRow).where(DashboardSessionRow.account == account)
        if key is not None:
            if not re.fullmatch(r"[0-9a-f]{16}", key):
                return 0
            query = query.where(DashboardSessionRow.token_sha256.startswith(key))
        with self.ledger.transaction() as db:
            ended = int(db.execute(query).rowcount or 0)  # type: ignore[attr-defined]
            if ended:
                self.ledger.append_event(
                    db, "dashboard.sessions-revoked",
                    payload={"account": account, "sessions": ended, "session": key, "by": by},
                )  # fmt: skip
        return ended


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
