"""The engine's tamper check (`Ledger.stored_run_mismatches`) with its reads sent two ways, in
CPU time: by `ledger._cursor.read` (through `Connection._cursor_execute`: cursor events, echo,
SQLAlchemy's error handling), as the check does since readpath26, and on a bare DB-API cursor
(`raw`: the SQL rendered once, errors wrapped with `DBAPIError.instance`), as it did before.

One process, one ledger built as benchmarks/tamper_check.py builds it (a run of `--hops` hops,
each handoff's checkpoint, commit and next lease in one transaction); after each commit the
check runs `--checks` times per way, the ways alternating (A B B A ...), so both read the same
rows: the first after a commit compares the rows the commit wrote, the others find the run as
known. Figures: CPU time of the calling thread (`time.thread_time`), the first two commits'
checks left out. Writes JSON + Markdown under benchmarks/results/.

    nice -n 19 python benchmarks/run_check_reads.py --name run-check-reads
    nice -n 19 python benchmarks/run_check_reads.py --postgres ADMIN_URL --name run-check-reads-pg
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ledger_commit import scratch_database  # noqa: E402
from benchmarks.tamper_check import (  # noqa: E402
    _checkpoint,
    leased_run,
    ledger_arguments,
    run_context,
)
from coordinator.ledger import _cursor, _run_check  # noqa: E402


@functools.lru_cache(maxsize=64)
def _rendered(query: sa.Select[Any], dialect: sa.Dialect) -> tuple[str, Any, dict[str, Any]]:
    compiled = query.compile(dialect=dialect)
    literals = {name: bind.effective_value for name, bind in compiled.binds.items()
                if not bind.required}  # fmt: skip
    positions = tuple(compiled.positiontup) if compiled.positiontup is not None else None
    return compiled.string, positions, literals


def _raw_read(
    connection: sa.Connection, query: sa.Select[Any], params: dict[str, Any]
) -> list[tuple[Any, ...]]:
    """The check's reads as they were before readpath26 (`_run_check._fetch`)."""
    dialect = connection.dialect
    sql, positions, literals = _rendered(query, dialect)
    args: Any = {**literals, **params}
    if positions is not None:
        args = tuple(args[name] for name in positions)
    cursor = connection.connection.cursor()
    try:
        cursor.execute(sql, args)
        return list(cursor.fetchall())
    except dialect.loaded_dbapi.Error as exc:
        raise sa.exc.DBAPIError.instance(
            sql, args, exc, dialect.loaded_dbapi.Error, dialect=dialect
        ) from exc
    finally:
        cursor.close()


WAYS: dict[str, Any] = {
    "cursor_read": _cursor,
    "raw": types.SimpleNamespace(read=_raw_read, result_processor=_cursor.result_processor),
}


def _use(way: Any) -> None:
    """The check's reads sent by `way` (its module's `_cursor`, or `raw`'s stand-in)."""
    vars(_run_check)["_cursor"] = way


def run(hops: int, checks: int, postgres: str | None) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in WAYS}
    with tempfile.TemporaryDirectory() as tmp, scratch_database(postgres) as url:
        sqlite = f"sqlite:///{Path(tmp) / 'ledger.sqlite3'}"
        ledger, run_id, rows = leased_run(url or sqlite, "run-check-reads", hops)
        parent: str | None = None
        try:
            for i in range(hops - 1):
                ledger.transition_hop(rows[i].id, expected=("leased",), status="training",
                                      event="hop.training")  # fmt: skip
                for k in range(checks):
                    order = list(WAYS) if (i + k) % 2 == 0 else list(reversed(WAYS))
                    for name in order:
                        _use(WAYS[name])
                        started = time.thread_time()
                        found = ledger.stored_run_mismatches(run_id, None)
                        cpu = time.thread_time() - started
                        assert found == [], found
                        if i >= 2:
                            samples[name].append(cpu)
                _use(_cursor)
                output = _checkpoint(run_id, rows[i].id, parent)
                with ledger.transaction():
                    ledger.record_checkpoint(output)
                    ledger.commit_hop(rows[i].id, lease_token="token",
                                      output_sha256=output.sha256, metrics={"loss": 0.3},
                                      train_started_at_ns=1, train_finished_at_ns=2,
                                      base_model_sha256="cd" * 32)  # fmt: skip
                    ledger.lease_hop(rows[i + 1].id, "token", output.sha256)
                parent = output.sha256
            assert ledger.run_checks.full_checks == 1  # every later check: the short one
        finally:
            _use(_cursor)
            ledger.close()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hops", type=int, default=42)
    parser.add_argument("--checks", type=int, default=6, help="checks per way after each commit")
    ledger_arguments(parser, "run-check-reads")
    args = parser.parse_args()
    rounds = [run(args.hops, args.checks, args.postgres) for _ in range(args.repeat)]
    load, database, shown = run_context(args)
    figures: dict[str, Any] = {"hops": args.hops, "checks": args.checks, "repeat": args.repeat,
                               "load": load, "database": database, "rounds": []}  # fmt: skip
    for samples in rounds:
        figures["rounds"].append({
            name: {"n": len(values),
                   "cpu_ms_median": round(statistics.median(values) * 1e3, 4),
                   "cpu_ms_mean": round(statistics.fmean(values) * 1e3, 4)}
            for name, values in samples.items()
        })  # fmt: skip
    pooled = {name: [v for samples in rounds for v in samples[name]] for name in WAYS}
    figures["pooled_cpu_ms_median"] = {
        name: round(statistics.median(values) * 1e3, 4) for name, values in pooled.items()
    }
    lines = [
        f"# The tamper check's reads: `_cursor.read` vs a raw cursor ({database})",
        "",
        f"Command: `python benchmarks/run_check_reads.py {shown}`. CPU ms of the "
        f"checking thread per check (a run of {args.hops} hops, {args.checks} checks per way "
        f"after each commit, alternating), median. Load average after: {load}.",
        "",
        "| round | checks per way | raw cursor (before) | `_cursor.read` (now) | difference |",
        "|---:|---:|---:|---:|---:|",
    ]
    for number, figure in enumerate(figures["rounds"], 1):
        raw, read = figure["raw"]["cpu_ms_median"], figure["cursor_read"]["cpu_ms_median"]
        lines.append(f"| {number} | {figure['raw']['n']} | {raw} | {read} | {read - raw:+.4f} |")
    raw, read = (figures["pooled_cpu_ms_median"][n] for n in ("raw", "cursor_read"))
    lines.append(f"| pooled | {len(pooled['raw'])} | {raw} | {read} | {read - raw:+.4f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(figures, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
