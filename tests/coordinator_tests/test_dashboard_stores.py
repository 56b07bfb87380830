"""Two writers of one dashboard account, token or session at once (SQLite and PostgreSQL): the
second reads the row under the lock, so it sees what the first wrote and loses no update."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

from argon2 import PasswordHasher

from coordinator.dashboard import Account, AccountError, AccountStore, DashboardRole
from coordinator.dashboard._auth import SessionStore
from coordinator.ledger import Ledger
from tests.coordinator_tests.test_ledger_writers import _blocked_at

T = TypeVar("T")
PASSWORD = "correct horse battery"


def _accounts(ledger: Ledger) -> AccountStore:
    store = AccountStore(ledger, PasswordHasher(time_cost=1, memory_cost=8192))
    store.add("olivia", DashboardRole.OPERATOR, PASSWORD, by="test")
    return store


def _meanwhile(
    ledger: Ledger, table: str, first: Callable[[], object], second: Callable[[], T]
) -> tuple[object, T | BaseException]:
    """`first` in a transaction held open until `second`, on another thread, reads or writes
    `table`'s row under the lock (it waits) or writes it on what it read before (unlocked);
    then `first` commits. Both outcomes (the second's exception, if it raised one)."""
    reached, threads = _blocked_at(
        ledger,
        lambda sql: sql.startswith(("BEGIN IMMEDIATE", f"UPDATE {table} ", f"DELETE FROM {table} ",
                                    f"INSERT INTO {table} "))
        or (f" FROM {table} " in f"{sql} " and "FOR UPDATE" in sql),
    )  # fmt: skip
    outcome: list[T | BaseException] = []

    def run_second() -> None:
        threads.add(threading.get_ident())
        try:
            outcome.append(second())
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run_second)
    with ledger.transaction() as session:
        done = first()
        session.flush()  # its writes hold their locks now
        thread.start()
        assert reached.wait(30)
    thread.join(30)
    assert not thread.is_alive()
    return done, outcome[0]


def test_a_login_link_used_twice_at_once_lets_one_in(ledger: Ledger) -> None:
    accounts = _accounts(ledger)
    token = accounts.issue_token("olivia", kind="login", by="test")
    first, second = _meanwhile(
        ledger, "api_tokens",
        lambda: accounts.account_for_token(token, kind="login"),
        lambda: accounts.account_for_token(token, kind="login"),
    )  # fmt: skip
    assert first == Account("olivia", DashboardRole.OPERATOR)
    assert second is None


def test_a_session_ended_while_it_is_read_is_gone_not_an_error(ledger: Ledger) -> None:
    accounts = _accounts(ledger)
    account = accounts.get("olivia")
    assert account is not None
    sessions = SessionStore(ledger, touch_every=timedelta(0))  # every read touches the row
    session = sessions.create(account, via="password", client="test")
    _, read = _meanwhile(
        ledger, "dashboard_sessions",
        lambda: sessions.end(session.id),
        lambda: sessions.get(session.id),
    )  # fmt: skip
    assert read is None


def test_one_account_added_twice_at_once_is_refused_once_with_one_line(ledger: Ledger) -> None:
    accounts = _accounts(ledger)
    _, second = _meanwhile(
        ledger, "accounts",
        lambda: accounts.add("noah", DashboardRole.VIEWER, PASSWORD, by="test"),
        lambda: accounts.add("noah", DashboardRole.ADMIN, PASSWORD, by="test"),
    )  # fmt: skip
    assert isinstance(second, AccountError)
    assert str(second) == "account 'noah' exists already"
    found = accounts.get("noah")
    assert found is not None and found.role is DashboardRole.VIEWER
    assert ledger.verify().ok
