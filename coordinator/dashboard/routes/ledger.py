"""The ledger: events filtered by run/site/kind (paged by sequence number), verify, export."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from coordinator.dashboard._deps import ServiceDep, Viewer
from coordinator.dashboard._render import render
from coordinator.dashboard._service import DashboardService, event_line
from coordinator.dashboard.schemas import EventPage, VerifyResult

router = APIRouter(tags=["pages"])
api = APIRouter(tags=["ledger"])

Limit = Annotated[int, Query(ge=1, le=500)]
Before = Annotated[int | None, Query(ge=1, le=2**62)]
Filter = Annotated[str | None, Query(max_length=64)]
_EXPORT_BATCH = 5000


@router.get("/ledger", response_class=HTMLResponse, include_in_schema=False)
def ledger_page(
    request: Request,
    service: ServiceDep,
    principal: Viewer,
    limit: Limit = 50,
    before: Before = None,
    run: Filter = None,
    site: Filter = None,
    kind: Filter = None,
) -> HTMLResponse:
    page = service.events(limit=limit, before=before, run_id=run or None, site=site or None,
                          kind=kind or None)  # fmt: skip
    filters = {"run": run or "", "site": site or "", "kind": kind or ""}
    return render(request, "ledger.html", principal, page=page, filters=filters, verify=None)


@router.get("/ledger/verify", response_class=HTMLResponse, include_in_schema=False)
def ledger_verify_page(request: Request, service: ServiceDep, principal: Viewer) -> HTMLResponse:
    page = service.events(limit=50)
    filters = {"run": "", "site": "", "kind": ""}
    return render(request, "ledger.html", principal, page=page, filters=filters,
                  verify=service.verify())  # fmt: skip


def _export(service: DashboardService) -> StreamingResponse:
    def lines() -> Iterator[str]:
        after = 0
        while rows := service.ledger.events_page(limit=_EXPORT_BATCH, after=after, ascending=True):
            yield "".join(event_line(row) + "\n" for row in rows)
            after = rows[-1].seq

    return StreamingResponse(
        lines(),
        media_type="application/x-ndjson",
        headers={"Content-Disposition": 'attachment; filename="baton-ledger.jsonl"'},
    )


@router.get("/ledger/export.jsonl", include_in_schema=False)
def ledger_export_page(service: ServiceDep, _: Viewer) -> StreamingResponse:
    return _export(service)


@api.get("/events")
def events(
    service: ServiceDep,
    _: Viewer,
    limit: Limit = 50,
    before: Before = None,
    run: Filter = None,
    site: Filter = None,
    kind: Filter = None,
) -> EventPage:
    """Ledger events newest first; pass `next_before` back as `before` for older ones."""
    return service.events(limit=limit, before=before, run_id=run or None, site=site or None,
                          kind=kind or None)  # fmt: skip


@api.get("/ledger/verify")
def verify(service: ServiceDep, _: Viewer) -> VerifyResult:
    """Walks the whole hash chain; names the first event that does not verify."""
    return service.verify()


@api.get("/ledger/export.jsonl", response_class=StreamingResponse)
def export(service: ServiceDep, _: Viewer) -> StreamingResponse:
    """Every event with its hashes, as JSON lines (as `baton ledger export`)."""
    return _export(service)
