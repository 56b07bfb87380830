"""`baton ledger` (verify, export the tamper-evident ledger) and `baton store gc`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from coordinator.console._options import DbUrl, StateDir, console, err, fail
from protocols.exit_codes import EXIT_BAD_INPUT, EXIT_RUN_FAILED

if TYPE_CHECKING:
    from coordinator.ledger import Ledger

__all__ = ["ledger_app", "store_app"]

ledger_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="Verify and export the tamper-evident ledger.",
    no_args_is_help=True,
)
store_app = typer.Typer(
    pretty_exceptions_show_locals=False,
    help="The checkpoint store: retention and clean-up.",
    no_args_is_help=True,
)


def _ledger(state_dir: Path | None, database_url: str | None) -> Ledger:
    if database_url is None:
        if state_dir is None:
            raise fail("give --state-dir or --database-url", EXIT_BAD_INPUT)
        path = state_dir / "ledger.sqlite3"
        if not path.is_file():
            raise fail(f"no ledger at {path}", EXIT_BAD_INPUT)
        database_url = f"sqlite:///{path.resolve()}"
    from sqlalchemy.exc import SQLAlchemyError

    from coordinator.ledger import Ledger
    from coordinator.startup import StartupError, database_error, parse_database_url

    try:
        url = parse_database_url(database_url)
    except StartupError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    if url.get_backend_name() == "sqlite":
        # Opening a missing SQLite file would create an empty one: say so, create nothing.
        path = Path(url.database or "")
        if not url.database or not path.is_file():
            raise fail(f"no ledger database at {path}: check --database-url", EXIT_BAD_INPUT)
    ledger = Ledger(database_url)
    try:
        with ledger.engine.connect():
            pass
    except SQLAlchemyError as exc:
        ledger.close()
        raise fail(str(database_error(database_url, exc)), EXIT_BAD_INPUT) from exc
    return ledger


@ledger_app.command("verify")
def ledger_verify(
    state_dir: StateDir = None,
    database_url: DbUrl = None,
    anchor: Annotated[
        list[Path] | None,
        typer.Option(help="A signed head kept by a site (`baton-site ledger-head`); repeatable"),
    ] = None,
    heads: Annotated[
        Path | None, typer.Option(help="Signed heads file (default: STATE_DIR/ledger-heads.jsonl)")
    ] = None,
    ca: Annotated[
        Path, typer.Option("--ca", envvar="BATON_CA", help="CA certificate (to check signed heads)")
    ] = Path("pki/ca.crt"),
    processes: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Processes that walk a long chain, one seq range each (default: 2, or 1 on "
            "one CPU)",
        ),
    ] = None,
) -> None:
    """Check the event chain, every state row against it, and that it reaches its signed heads.

    Names the first altered, deleted or inserted event, every table row and column that differs
    from the event that last wrote it, and a ledger cut short of, or differing from, a signed head
    (exit 1).
    """
    from coordinator.ledger import HEADS_FILE, HeadProblem, check_heads, read_heads
    from protocols.ledger_head import HeadError, SignedHead

    sources: list[Path] = list(anchor or [])
    if heads is not None:
        sources.insert(0, heads)
    elif state_dir is not None and (state_dir / HEADS_FILE).is_file():
        sources.insert(0, state_dir / HEADS_FILE)
    signed: list[tuple[str, SignedHead]] = []
    try:
        for source in sources:
            signed.extend((str(source), head) for head in read_heads(source))
    except HeadError as exc:
        raise fail(str(exc), EXIT_BAD_INPUT) from exc
    ca_pem: bytes | None = ca.read_bytes() if ca.is_file() else None
    if anchor and ca_pem is None:
        raise fail(f"no CA certificate at {ca}: give --ca to check the anchor", EXIT_BAD_INPUT)
    if signed and ca_pem is None:  # the state dir's own heads: truncation is still found
        err.print(
            Text.assemble(
                ("note: ", "yellow"),
                f"signatures of {len(signed)} signed head(s) not checked: no CA certificate at "
                f"{ca} (give --ca)",
            ),
            highlight=False,
            soft_wrap=True,
        )
    ledger = _ledger(state_dir, database_url)
    try:
        rows_covered = ledger.covers_state_rows()
        if processes is None:
            processes = min(2, len(os.sched_getaffinity(0)))
        result = ledger.verify(rows=rows_covered, processes=processes)
        problems: list[HeadProblem] = []
        newest = None
        if signed:
            problems, newest = check_heads(ledger, signed, ca_pem=ca_pem, last_seq=result.last_seq)
    finally:
        ledger.close()
    failures = [m.message for m in result.row_mismatches]
    failures += [p.message for p in problems]
    if result.chain_break is not None:
        failures.insert(
            0,
            f"ledger does not verify at event {result.chain_break.seq}: "
            f"{result.chain_break.reason}",
        )
    for seq, finding in result.recorded_mismatches:  # history: the rows may be restored since
        err.print(
            Text.assemble(
                ("note: ", "yellow"),
                f"ledger event #{seq} (ledger.mismatch) records "
                f"that the engine paused a run over altered rows: {finding}",
            ),
            highlight=False,
            soft_wrap=True,
        )
    for message in failures[:50]:  # values may hold brackets: printed as text, not markup
        err.print(Text.assemble(("error: ", "red"), message), highlight=False, soft_wrap=True)
    if len(failures) > 50:
        err.print(f"[red]error:[/red] and {len(failures) - 50} more")
    if failures:
        raise typer.Exit(EXIT_RUN_FAILED)
    console.print(
        f"ledger verifies: {result.events} events, head {result.head}; "
        + (
            "every state row matches the event that last wrote it"
            if rows_covered
            else "state rows NOT checked: the schema predates row snapshots (start the "
            "coordinator once to migrate it)"
        ),
        highlight=False,
        soft_wrap=True,
    )
    if newest is not None:
        message = f"reaches the newest {newest.describe()} of {len(signed)} checked"
    else:
        message = "no signed head checked: a cut tail would go unnoticed (give --anchor)"
    console.print(message, highlight=False, soft_wrap=True)


@ledger_app.command("export")
def ledger_export(
    out: Annotated[Path, typer.Option(help="JSONL file to write ('-' for stdout)")],
    state_dir: StateDir = None,
    database_url: DbUrl = None,
) -> None:
    """Write every event, with its hashes, as JSON lines for auditors."""
    ledger = _ledger(state_dir, database_url)
    try:
        lines = [
            json.dumps({"seq": e.seq, "at": e.at, "kind": e.kind, "run_id": e.run_id,
                        "hop_id": e.hop_id, "site": e.site, "payload": e.payload,
                        "prev_hash": e.prev_hash, "hash": e.hash}, sort_keys=True)
            for e in ledger.events()
        ]  # fmt: skip
    finally:
        ledger.close()
    text = "".join(line + "\n" for line in lines)
    if str(out) == "-":
        sys.stdout.write(text)
    else:
        out.write_text(text)
        console.print(f"{len(lines)} events written to {out}")


def _bytes(size: int) -> str:
    return f"{size / 1024**2:.1f} MiB" if size >= 1024**2 else f"{size / 1024:.1f} KiB"


@store_app.command("gc")
def store_gc(
    state_dir: StateDir = None,
    database_url: DbUrl = None,
    config: Annotated[
        Path | None, typer.Option(help="Coordinator TOML settings (state dir, database, policy)")
    ] = None,
    keep: Annotated[
        int | None,
        typer.Option(
            min=0,
            envvar="BATON_CHECKPOINT_RETENTION",
            help="Checkpoints kept per finished run besides its final (default: the "
            "settings' checkpoint_retention, 2)",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run/--delete", help="Only list what would go (default)")
    ] = True,
) -> None:
    """Apply the retention policy: delete checkpoints nothing needs (final + N kept per run)."""
    from coordinator.retention import collect_garbage
    from coordinator.store import CheckpointStore

    if config is not None:
        from pydantic import ValidationError

        from coordinator.settings import load_coordinator_settings
        from protocols.settings import SettingsFileError

        try:
            settings = load_coordinator_settings(config)
        except (ValidationError, FileNotFoundError, SettingsFileError) as exc:
            raise fail(f"bad coordinator settings: {exc}", EXIT_BAD_INPUT) from exc
        state_dir = state_dir or settings.state_dir
        database_url = database_url or settings.database_url
        keep = settings.checkpoint_retention if keep is None else keep
    if state_dir is None:
        raise fail("give --state-dir (the store lives there) or --config", EXIT_BAD_INPUT)
    if not (state_dir / "checkpoints").is_dir():
        raise fail(f"no checkpoint store at {state_dir / 'checkpoints'}", EXIT_BAD_INPUT)
    ledger = _ledger(state_dir, database_url)
    try:
        deletions = collect_garbage(
            ledger, CheckpointStore(state_dir / "checkpoints"), 2 if keep is None else keep,
            delete=not dry_run,
        )  # fmt: skip
    finally:
        ledger.close()
    table = Table("checkpoint", "run", "reason", "size")
    for deletion in deletions:
        table.add_row(deletion.sha256[:16], (deletion.run_id or "")[:8], deletion.reason,
                      _bytes(deletion.size))  # fmt: skip
    if deletions:
        console.print(table)
    freed = _bytes(sum(d.size for d in deletions))
    if dry_run:
        console.print(f"dry run: {len(deletions)} checkpoint(s) would be deleted, {freed} freed; "
                      "run with --delete to delete them")  # fmt: skip
    else:
        console.print(f"deleted {len(deletions)} checkpoint(s), {freed} freed (ledgered)")
