"""Dashboard accounts, API tokens and one-time login links, kept in the ledger's database."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import IntEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.exc import IntegrityError

from coordinator.ledger import AccountRow, ApiTokenRow, Ledger, locked_get

__all__ = ["Account", "AccountError", "AccountStore", "DashboardRole"]

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MIN_PASSWORD_LENGTH = 12
TOKEN_PREFIX = "baton_"


class DashboardRole(IntEnum):
    """What an account may do; each role may do everything the ones below it may."""

    VIEWER = 1  # read every page
    OPERATOR = 2  # steer runs: start, pause, resume, abort, skip, evaluate; download adapters
    ADMIN = 3  # revoke certificates

    @classmethod
    def parse(cls, name: str) -> DashboardRole:
        try:
            return cls[name.upper()]
        except KeyError:
            raise AccountError(f"unknown role {name!r}: choose viewer, operator or admin") from None

    @property
    def label(self) -> str:
        return self.name.lower()


class AccountError(ValueError):
    """A refused account operation (bad name, weak password, unknown account...)."""


@dataclass(frozen=True)
class Account:
    name: str
    role: DashboardRole


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes for timezone-aware columns.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class AccountStore:
    """Accounts and tokens; creating either appends a ledger event (never the secret)."""

    def __init__(self, ledger: Ledger, hasher: PasswordHasher | None = None) -> None:
        self.ledger = ledger
        self.hasher = hasher or PasswordHasher()
        # Verifying against this when the account is unknown keeps both answers equally slow.
        self._dummy_hash = self.hasher.hash(secrets.token_hex(16))

    def add(self, name: str, role: DashboardRole, password: str, *, by: str) -> Account:
        """Creates an account.

        Raises:
            AccountError: The name is malformed or taken, or the password is too short.
        """
        if not _NAME.match(name):
            raise AccountError(
                f"account name {name!r} must be 1-64 characters of a-z, 0-9, '.', '_' or '-'"
            )
        if len(password) < MIN_PASSWORD_LENGTH:
            raise AccountError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
        password_hash = self.hasher.hash(password)  # slow: not while holding a lock
        try:
            with self.ledger.transaction() as session:
                if locked_get(session, AccountRow, name) is not None:
                    raise AccountError(f"account {name!r} exists already")
                session.add(
                    AccountRow(
                        name=name, role=role.label, password_hash=password_hash,
                        created_at=_now(),
                    )
                )  # fmt: skip
                self.ledger.append_event(
                    session,
                    "dashboard.account-added",
                    payload={"account": name, "role": role.label, "by": by},
                )
        except IntegrityError:  # added meanwhile (PostgreSQL locks no row that is not there)
            raise AccountError(f"account {name!r} exists already") from None
        return Account(name, role)

    def get(self, name: str) -> Account | None:
        with self.ledger.transaction() as session:
            row = session.get(AccountRow, name)
            return Account(row.name, DashboardRole.parse(row.role)) if row else None

    def authenticate(self, name: str, password: str) -> Account | None:
        """The account if the password matches, else None (in the same time either way)."""
        with self.ledger.transaction() as session:
            row = session.get(AccountRow, name)
            stored = row.password_hash if row is not None else self._dummy_hash
            try:
                self.hasher.verify(stored, password)
            except (VerificationError, InvalidHashError):
                return None
            if row is None:
                return None
            account = Account(row.name, DashboardRole.parse(row.role))
        if self.hasher.check_needs_rehash(stored):
            rehashed = self.hasher.hash(password)
            with self.ledger.transaction() as session:
                row = locked_get(session, AccountRow, name)
                if row is not None and row.password_hash == stored:  # not changed meanwhile
                    row.password_hash = rehashed
        return account

    def issue_token(
        self, name: str, *, kind: str = "api", valid_for: timedelta | None = None, by: str
    ) -> str:
        """A new bearer token ("api") or one-time login link token ("login"), shown once."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.ledger.transaction() as session:
            if session.get(AccountRow, name) is None:
                raise AccountError(f"no account {name!r}")
            now = _now()
            session.add(
                ApiTokenRow(
                    sha256=_digest(token),
                    account=name,
                    kind=kind,
                    created_at=now,
                    expires_at=now + valid_for if valid_for else None,
                )
            )
            self.ledger.append_event(
                session,
                f"dashboard.{kind}-token-issued",
                payload={"account": name, "token_sha256": _digest(token)[:16], "by": by},
            )
        return token

    def account_for_token(self, token: str, *, kind: str = "api") -> Account | None:
        """The account a token belongs to; a login token works once."""
        with self.ledger.transaction() as session:
            # A login token is spent by its first use: read under the lock, so that two uses
            # at once cannot both find it unused. An API token is only read.
            digest = _digest(token)
            row = (
                locked_get(session, ApiTokenRow, digest)
                if kind == "login"
                else session.get(ApiTokenRow, digest)
            )
            if row is None or row.kind != kind:
                return None
            now = _now()
            if row.expires_at is not None and _aware(row.expires_at) < now:
                return None
            if kind == "login":
                if row.used_at is not None:
                    return None
                row.used_at = now
            account = session.get(AccountRow, row.account)
            assert account is not None
            return Account(account.name, DashboardRole.parse(account.role))
