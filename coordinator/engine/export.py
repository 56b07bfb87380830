"""The final adapter of a completed run, exported as a PEFT directory beside the run."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path

from coordinator.engine.ledger_writer import LedgerWriter
from coordinator.ledger import Ledger
from coordinator.storage_faults import StorageHealth
from coordinator.store import CheckpointStore, fsync_write
from protocols.checkpoint import inspect_bundle

__all__ = ["complete_run", "export_final", "final_adapter_dir"]


def final_adapter_dir(runs_dir: Path, run_id: str) -> Path:
    return runs_dir / run_id / "final_adapter"


def export_final(store: CheckpointStore, out: Path, sha256: str) -> None:
    """Writes the final adapter as a PEFT directory (adapter_model.safetensors + config)."""
    data = store.read(sha256)
    bundle = inspect_bundle(data, expected_sha256=sha256)
    fsync_write(out / "adapter_model.safetensors", data)
    fsync_write(out / "adapter_config.json", json.dumps(bundle.adapter_config, indent=2).encode())
    fsync_write(out / "baton_manifest.json", bundle.manifest.to_json().encode())


async def complete_run(
    ledger: Ledger,
    writer: LedgerWriter,
    store: CheckpointStore,
    storage: StorageHealth,
    runs_dir: Path,
    run_id: str,
    final_sha256: str,
) -> None:
    """Exports a running run's final adapter beside it (a worker thread), then marks the run
    completed (on the ledger writer's thread).

    Raises:
        StorageFault: The export could not be written; the run is still running.
    """
    # The export writes the adapter once more beside the run (plus two small files).
    needs = 0
    with contextlib.suppress(OSError):  # a missing bundle fails below, as before
        needs = store.path(final_sha256).stat().st_size + 64 * 1024
    with storage.guard(f"export of run {run_id}'s final adapter", needs_bytes=needs):
        out = final_adapter_dir(runs_dir, run_id)
        await asyncio.to_thread(export_final, store, out, final_sha256)
        await writer.run(
            ledger.transition_run,
            run_id,
            expected=("running",),
            status="completed",
            payload={"final_sha256": final_sha256},
            final_sha256=final_sha256,
        )
