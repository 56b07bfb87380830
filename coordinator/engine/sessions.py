"""Connected sites: their open task streams, revoked certificates, approvals and views."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from coordinator.errors import InvalidInput, PreflightFailed
from coordinator.ledger import Base, Ledger, SiteRow
from coordinator.plan import RunPlan
from coordinator.preflight import SiteApprovals, SiteView, preflight_problems
from protocols.ledger_head import SignedHead
from protocols.v1 import baton_pb2 as pb

__all__ = ["SiteSession", "SiteSessions"]

logger = logging.getLogger(__name__)


@dataclass
class SiteSession:
    """One open task stream of a connected site."""

    site: str
    serial: int = 0  # the certificate the stream was opened with
    queue: asyncio.Queue[pb.Task | None] = field(default_factory=asyncio.Queue)

    def close(self) -> None:
        self.queue.put_nowait(None)


class SiteSessions:
    """The task stream of each connected site, and what the coordinator knows of every site."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._sessions: dict[str, SiteSession] = {}
        self._revoked: dict[str, str] | None = None  # serial hex -> reason, cached
        self._signed_head: SignedHead | None = None  # the newest, sent to every site stream
        self._approvals: dict[str, SiteApprovals] = {}  # site -> what it approved (last hello)
        self._offline_since: dict[str, datetime] = {}  # site -> when its task stream closed
        self._provisional: set[str] = set()  # sites whose last hello accepts provisional hops
        # The ledger's site rows, read once and again after this process writes one (or the
        # engine notices an outside write): a run's view asks why its next hop waits (an offline
        # site's view) on the event loop, per admin call.
        self._site_rows: list[SiteRow] | None = None
        self._site_rows_written = 0  # raised by each commit of site rows (any thread)
        self._site_rows_lock = threading.Lock()
        ledger.row_observers.append(self._rows_written)

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, site: object) -> bool:
        return site in self._sessions

    def get(self, site: str) -> SiteSession | None:
        """The site's open task stream, or None while it is not connected."""
        return self._sessions.get(site)

    def connected_sites(self) -> set[str]:
        return set(self._sessions)

    # ---- certificates -------------------------------------------------------------------------

    def revocation(self, serial: int) -> str | None:
        """The reason a certificate serial was revoked, or None."""
        if self._revoked is None:
            self._revoked = self.ledger.revocations()
        return self._revoked.get(format(serial, "x"))

    def revoke(self, serial: str, reason: str, *, by: str) -> int:
        """Revokes a certificate serial (hex) and closes the streams opened with it."""
        try:
            number = int(serial, 16)
        except ValueError:
            raise InvalidInput(f"not a hexadecimal certificate serial: {serial!r}") from None
        self.ledger.revoke(format(number, "x"), reason=reason, by=by)
        self._revoked = None
        closed = 0
        for session in list(self._sessions.values()):
            if session.serial == number:
                session.close()
                self.disconnect(session)
                closed += 1
        logger.warning("certificate %x revoked by %s (%s); %d stream(s) closed",
                       number, by, reason, closed)  # fmt: skip
        return closed

    # ---- connections --------------------------------------------------------------------------

    def connect(self, site: str, serial: int = 0) -> SiteSession:
        """Registers a site's new task stream, replacing (and closing) an older one."""
        session = SiteSession(site, serial)
        old = self._sessions.get(site)
        if old is not None:
            old.close()
        self._sessions[site] = session
        logger.info("site %s connected its task stream", site)
        if self._signed_head is not None:
            session.queue.put_nowait(pb.Task(ledger_head=self._signed_head.to_proto()))
        return session

    def disconnect(self, session: SiteSession) -> None:
        if self._sessions.get(session.site) is session:
            del self._sessions[session.site]
            self._offline_since[session.site] = datetime.now(UTC)
            logger.info("site %s task stream closed", session.site)

    def publish_head(self, head: SignedHead) -> None:
        """Hands a newly signed ledger head to every connected site (they keep the newest)."""
        self._signed_head = head
        for session in self._sessions.values():
            session.queue.put_nowait(pb.Task(ledger_head=head.to_proto()))

    @staticmethod
    async def tasks(session: SiteSession) -> AsyncIterator[pb.Task]:
        while (task := await session.queue.get()) is not None:
            yield task

    # ---- preflight ----------------------------------------------------------------------------

    def report_approvals(self, site: str, approvals: SiteApprovals) -> None:
        """Remembers what a site said at hello it approved (for preflight)."""
        self._approvals[site] = approvals

    def report_provisional(self, site: str, accepts: bool) -> None:
        """Remembers whether a site's agent said at hello that it holds a provisional hop task
        until its lease decision (`HopTask.provisional`)."""
        if accepts:
            self._provisional.add(site)
        else:
            self._provisional.discard(site)

    def accepts_provisional(self, site: str) -> bool:
        return site in self._provisional

    def site_rows(self) -> list[SiteRow]:
        """The ledger's site rows by name: held, or read if a site row was written since."""
        with self._site_rows_lock:
            rows, written = self._site_rows, self._site_rows_written
        if rows is None:
            rows = self.ledger.sites()
            with self._site_rows_lock:
                if self._site_rows_written == written:  # none committed while it was read
                    self._site_rows = rows
        return rows

    def forget_site_rows(self) -> None:
        """The site rows are read again at their next use (the ledger was written elsewhere)."""
        with self._site_rows_lock:
            self._site_rows_written += 1
            self._site_rows = None

    def _rows_written(self, rows: Sequence[Base]) -> None:
        if any(isinstance(row, SiteRow) for row in rows):
            self.forget_site_rows()

    def site_views(self, rows: Sequence[SiteRow] | None = None) -> dict[str, SiteView]:
        """Every registered site as this coordinator knows it: connection, data, approvals.

        Args:
            rows: The sites' ledger rows, if read already (`ListSites`, on the ledger reader's
                thread: this only looks connections and approvals up, never iterates them).
        """
        views = {}
        for row in self.site_rows() if rows is None else rows:
            dropped = self._offline_since.get(row.name)
            views[row.name] = SiteView(
                name=row.name,
                connected=row.name in self._sessions,
                offline_since=dropped or row.last_seen_at,
                offline_since_exact=dropped is not None,
                base_models=row.base_models,
                datasets=row.datasets,
                approvals=self._approvals.get(row.name),
            )
        return views

    def preflight(self, plan: RunPlan, *, allow_offline: bool = False) -> None:
        """Refuses a run its sites would not run, listing every problem (one per line).

        Raises:
            PreflightFailed: One problem per line of its message.
        """
        problems = preflight_problems(plan, self.site_views(), allow_offline=allow_offline)
        if problems:
            raise PreflightFailed("\n".join(problems))
