"""Time and peak memory of `baton ledger verify` (chain + state rows) on a large SQLite ledger.

Builds a ledger through the repository's own append path (one run of H hops, each hop leased
and committed many times over so that every event carries a row snapshot), then runs
`Ledger.verify()` in a fresh process and reports wall time and peak RSS.

    .venv/bin/python benchmarks/ledger_verify.py --events 100000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from coordinator.ledger import HopRow, Ledger

RESULTS = Path(__file__).resolve().parent / "results"


def build(url: str, events: int, hops: int) -> None:
    ledger = Ledger(url)
    ledger.migrate()
    run_id = uuid.uuid4().hex
    rows = [
        HopRow(
            id=uuid.uuid4().hex,
            run_id=run_id,
            index=i,
            site=f"site-{i % 5}",
            hyperparameters={"learning_rate": 1e-3, "steps": 30},
            status="pending",
            metrics={},
        )
        for i in range(hops)
    ]
    ledger.create_run(run_id, "bench", {"task": "tabular", "dataset": "d"}, rows, None)
    # One transaction per batch (the append path is the same; it spares a commit per event).
    written, batch = 1, 1000
    while written < events:
        with ledger.transaction() as session:
            for _ in range(min(batch, events - written)):
                hop = session.get(HopRow, rows[written % hops].id)
                assert hop is not None
                hop.attempts += 1
                hop.metrics = {"loss": 1.0 / written}
                ledger.append_event(
                    session,
                    "hop.bench",
                    run_id=run_id,
                    hop_id=hop.id,
                    payload={"attempts": hop.attempts},
                )
                written += 1
    ledger.close()


def verify(url: str) -> dict[str, float]:
    ledger = Ledger(url)
    start = time.perf_counter()
    result = ledger.verify()
    seconds = time.perf_counter() - start
    ledger.close()
    assert result.ok, result
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"events": result.events, "seconds": round(seconds, 2), "peak_rss_mib": round(peak_mib)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--hops", type=int, default=200)
    parser.add_argument("--verify-only", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.verify_only:
        print(json.dumps(verify(args.verify_only)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'ledger.sqlite3'}"
        started = time.perf_counter()
        build(url, args.events, args.hops)
        built = time.perf_counter() - started
        out = subprocess.run(
            [sys.executable, __file__, "--verify-only", url],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    figures = {**json.loads(out), "hops": args.hops, "build_seconds": round(built, 1)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ledger_verify.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
