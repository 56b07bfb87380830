"""Dashboard page latency over a large ledger: 1,000 runs and 1M events (issue 12).

    .venv/bin/python benchmarks/dashboard.py              # 1,000 runs, 1,000,000 events
    .venv/bin/python benchmarks/dashboard.py --quick      # 100 runs, 50,000 events

Fills a SQLite ledger by bulk insert (the same rows and hash chain the engine writes), then
times each page through the real app (FastAPI TestClient, in process, no TLS) with an API
token: median and p99 over --repeat requests after warm-up. Writes results/dashboard.json
and results/dashboard.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import insert

from coordinator.dashboard import AccountStore, DashboardRole, create_app
from coordinator.engine import RunEngine
from coordinator.ledger import (
    GENESIS_HASH,
    CheckpointRow,
    EventRow,
    HopRow,
    Ledger,
    RunRow,
    SiteRow,
    event_hash,
)
from coordinator.store import CheckpointStore

RESULTS = Path(__file__).resolve().parent / "results"
SITES = [f"hospital-{c}" for c in "abcdefgh"]
HOPS_PER_RUN = 8
PLAN = {"name": "bench", "task": "tabular", "dataset": "heart", "labels": ["0", "1"],
        "sites": SITES[:4], "cycles": 2, "options": {"model": "logistic"},
        "defaults": {"steps": 30, "batch_size": 4, "learning_rate": 0.05}}  # fmt: skip


def fill(ledger: Ledger, n_runs: int, n_events: int) -> list[str]:
    """Bulk-inserts sites, runs, hops, checkpoints and a valid event chain; returns run ids."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    run_ids = [uuid.uuid4().hex for _ in range(n_runs)]
    runs, hops, checkpoints, events = [], [], [], []
    prev = GENESIS_HASH
    seq = 0

    def event(kind: str, run_id: str | None, hop_id: str | None, site: str | None,
              payload: dict[str, Any], at: datetime) -> None:  # fmt: skip
        nonlocal prev, seq
        stamp = at.isoformat(timespec="microseconds")
        digest = event_hash(prev, stamp, kind, run_id, hop_id, site, payload)
        seq += 1
        events.append({"seq": seq, "at": stamp, "kind": kind, "run_id": run_id,
                       "hop_id": hop_id, "site": site, "payload": payload, "prev_hash": prev,
                       "hash": digest})  # fmt: skip
        prev = digest

    per_run = max((n_events - 1) // n_runs, HOPS_PER_RUN * 4 + 1)
    for number, run_id in enumerate(run_ids):
        created = start + timedelta(minutes=number)
        status = "completed" if number < n_runs - 10 else ("running", "paused")[number % 2]
        runs.append({"id": run_id, "name": f"bench-{number}", "status": status, "plan": PLAN,
                     "base_model_sha256": None, "created_at": created,
                     "finished_at": created + timedelta(minutes=1) if status == "completed"
                     else None, "final_sha256": None, "error": None})  # fmt: skip
        event("run.created", run_id, None, None, {"name": f"bench-{number}"}, created)
        parent = None
        for index in range(HOPS_PER_RUN):
            hop_id, site = uuid.uuid4().hex, SITES[index % 4]
            done = status == "completed" or index < 3
            sha = uuid.uuid4().hex + uuid.uuid4().hex
            hops.append({"id": hop_id, "run_id": run_id, "index": index, "site": site,
                         "hyperparameters": {"steps": 30}, "status": "committed" if done
                         else "pending", "lease_token": None, "attempts": 1 if done else 0,
                         "leased_at": created if done else None, "input_sha256": parent,
                         "output_sha256": sha if done else None,
                         "metrics": {"auroc": 0.7 + 0.01 * index, "loss": 0.6 - 0.02 * index}
                         if done else {}, "train_started_at_ns": 1 if done else None,
                         "train_finished_at_ns": 2 if done else None,
                         "committed_at": created + timedelta(seconds=5) if done else None,
                         "error_code": None, "error": None})  # fmt: skip
            for kind in ("hop.leased", "hop.training", "hop.committed"):
                if done or kind == "hop.leased":
                    event(kind, run_id, hop_id, site, {"index": index}, created)
            if done:
                checkpoints.append({"sha256": sha, "size": 1024, "run_id": run_id,
                                    "hop_id": hop_id, "producer_site": site,
                                    "parent_sha256": parent, "manifest": {}, "tensors": [],
                                    "signature": "", "producer_certificate": "",
                                    "stored_at": created})  # fmt: skip
                event("checkpoint.stored", run_id, hop_id, site, {"sha256": sha}, created)
                parent = sha
        if status == "completed":
            runs[-1]["final_sha256"] = parent
        # The bulk of a real ledger: site check-ins between runs (no run id).
        while seq < min((number + 1) * per_run, n_events):
            event("site.hello", None, None, SITES[seq % len(SITES)], {"agent_version": "1"},
                  created)  # fmt: skip
    while seq < n_events:
        event("site.hello", None, None, SITES[seq % len(SITES)], {"agent_version": "1"}, start)
    with ledger.transaction() as session:
        now = datetime.now(UTC)
        session.execute(insert(SiteRow), [
            {"name": s, "agent_version": "1", "capabilities": [], "base_models": [],
             "datasets": [{"name": "heart"}], "certificate_serial": f"{i + 1:x}",
             "certificate_expires_at": now + timedelta(days=10 + 100 * i), "first_seen_at": now,
             "last_seen_at": now} for i, s in enumerate(SITES)])  # fmt: skip
        session.execute(insert(RunRow), runs)
        session.execute(insert(HopRow), hops)
        session.execute(insert(CheckpointRow), checkpoints)
        for offset in range(0, len(events), 50_000):
            session.execute(insert(EventRow), events[offset : offset + 50_000])
    return run_ids


def time_pages(client: TestClient, pages: dict[str, str], repeat: int) -> dict[str, Any]:
    results = {}
    for name, path in pages.items():
        for _ in range(3):
            assert client.get(path).status_code == 200, path
        samples = []
        for _ in range(repeat):
            begin = time.perf_counter()
            response = client.get(path)
            samples.append((time.perf_counter() - begin) * 1000)
            assert response.status_code == 200, (path, response.status_code)
        samples.sort()
        results[name] = {
            "path": path,
            "median_ms": round(statistics.median(samples), 1),
            "p99_ms": round(samples[min(len(samples) - 1, int(0.99 * len(samples)))], 1),
            "max_ms": round(samples[-1], 1),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="100 runs, 50,000 events")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.events, args.repeat = 100, 50_000, 20
    with tempfile.TemporaryDirectory(prefix="baton-dashboard-bench-") as tmp:
        root = Path(tmp)
        ledger = Ledger(f"sqlite:///{root / 'ledger.sqlite3'}")
        ledger.migrate()
        began = time.perf_counter()
        run_ids = fill(ledger, args.runs, args.events)
        fill_seconds = time.perf_counter() - began
        engine = RunEngine(ledger, CheckpointStore(root / "checkpoints"), root / "runs",
                           ca_pem=b"", max_checkpoint_bytes=1 << 20)  # fmt: skip
        accounts = AccountStore(ledger, PasswordHasher(time_cost=1, memory_cost=8192))
        accounts.add("bench", DashboardRole.VIEWER, "benchmark password", by="benchmark")
        token = accounts.issue_token("bench", by="benchmark")
        middle = run_ids[len(run_ids) // 2]
        newest_seq = ledger.event_count()
        pages = {
            "overview": "/",
            "run list": "/runs",
            "run list, page 20": "/runs?offset=500",
            "run detail": f"/runs/{middle}",
            "ledger view": "/ledger",
            "ledger, older page": f"/ledger?before={newest_seq // 2}",
            "ledger, one run": f"/ledger?run={middle}",
            "ledger, one kind": "/ledger?kind=hop.committed",
            "ledger, one site": "/ledger?site=hospital-c",
            "API run list": "/api/v1/runs",
            "API run detail": f"/api/v1/runs/{middle}",
            "API events": "/api/v1/events",
        }
        app = create_app(engine, accounts=accounts)
        with TestClient(app, base_url="https://testserver",
                        headers={"Authorization": f"Bearer {token}"}) as client:  # fmt: skip
            timings = time_pages(client, pages, args.repeat)
            began = time.perf_counter()
            verified = client.get("/api/v1/ledger/verify").json()
            verify_seconds = time.perf_counter() - began
        ledger.close()
    result = {
        "runs": args.runs,
        "events": newest_seq,
        "repeat": args.repeat,
        "fill_seconds": round(fill_seconds, 1),
        "pages": timings,
        "verify": {"ok": verified["ok"], "seconds": round(verify_seconds, 1)},
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "database": "SQLite (WAL), file in a temp dir",
    }
    suffix = "-quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"dashboard{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Dashboard page latency over a large ledger",
        "",
        f"{args.runs:,} runs ({HOPS_PER_RUN} hops each), {newest_seq:,} events, SQLite; "
        f"{args.repeat} requests per page after 3 warm-ups, in process (TestClient, no TLS), "
        "authenticated with an API token. Produced by `benchmarks/dashboard.py`"
        f"{' --quick' if args.quick else ''}.",
        "",
        "| page | path | median ms | p99 ms |",
        "| --- | --- | ---: | ---: |",
        *(
            f"| {name} | `{t['path'][:40]}` | {t['median_ms']} | {t['p99_ms']} |"
            for name, t in timings.items()
        ),
        "",
        f"Full hash-chain verification (`/api/v1/ledger/verify`, on demand, not part of any "
        f"page): {result['verify']['seconds']} s, ok={verified['ok']}.",
        "",
    ]
    (RESULTS / f"dashboard{suffix}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
