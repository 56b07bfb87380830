"""Hop outputs coming in: resumable upload intake into the spool, lineage and custody checks.

A bundle is checked from its spool file (size, hash, format, values), then against the hop's
lineage and its producer's signature, before the spool file becomes the stored checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from coordinator.engine.leases import HopLeases
from coordinator.engine.spool import UploadSpool
from coordinator.errors import InvalidInput, NotFound, PermissionDenied
from coordinator.ledger import (
    LIVE_HOP_STATES,
    CheckpointRow,
    HopRow,
    Ledger,
    RunRow,
    TransitionRefused,
)
from coordinator.metrics import CoordinatorMetrics
from coordinator.storage_faults import StorageHealth, storage_fault_reason
from coordinator.store import CheckpointStore
from protocols.checkpoint import Bundle, CheckpointError, hash_prefix, inspect_bundle_file
from protocols.signing import SignatureError, verify_custody
from protocols.v1 import baton_pb2 as pb

__all__ = ["UploadIntake", "tensor_specs"]

logger = logging.getLogger(__name__)


def tensor_specs(bundle: Bundle) -> list[list[object]]:
    """JSON form of a bundle's tensor specs, as the ledger stores them (sorted by name)."""
    return [[t.name, t.dtype, list(t.shape)] for t in bundle.tensors]


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _absorb(fh: BinaryIO, hasher: Any, chunk: bytes) -> None:
    """Appends an upload chunk to its spool file and to the running hash."""
    fh.write(chunk)
    fh.flush()  # what UploadStatus reports is on disk, not in a buffer
    hasher.update(chunk)


class UploadIntake:
    """Receives hop outputs into the spool and the store; frees what an ended hop left."""

    def __init__(
        self,
        ledger: Ledger,
        store: CheckpointStore,
        spool: UploadSpool,
        storage: StorageHealth,
        metrics: CoordinatorMetrics,
        leases: HopLeases,
        lock: asyncio.Lock,
        *,
        ca_pem: bytes,
        max_checkpoint_bytes: int,
    ) -> None:
        self.ledger = ledger
        self.store = store
        self.spool = spool
        self.storage = storage
        self.metrics = metrics
        self.leases = leases
        self._lock = lock  # the engine's one lock over state transitions
        self.ca_pem = ca_pem
        self.max_checkpoint_bytes = max_checkpoint_bytes

    def checkpoint_for_download(self, site: str, sha256: str) -> CheckpointRow:
        """A site may download only the input of its leased hop or of its pending evaluation."""
        needed = self.ledger.live_hop_needs(site, sha256) or self.ledger.pending_evaluation_needs(
            site, sha256
        )
        if not needed:
            raise PermissionDenied(f"site {site} holds no lease that needs checkpoint {sha256}")
        row = self.ledger.checkpoint(sha256)
        if row is None:
            raise NotFound(f"checkpoint {sha256} is not in the store")
        return row

    async def receive_upload(
        self,
        site: str,
        certificate_pem: bytes,
        header: pb.UploadHeader,
        chunks: AsyncIterator[bytes],
    ) -> Bundle:
        """Accepts a hop's output bundle: size, hash, signature, format, values and lineage."""
        run, hop = self.leases.leased_hop(site, header.hop_id, header.lease_token)
        if header.total_size > self.max_checkpoint_bytes:
            raise InvalidInput(
                f"checkpoint of {header.total_size} bytes exceeds the "
                f"{self.max_checkpoint_bytes}-byte cap"
            )
        held = [row.sha256 for row in self.ledger.stored_checkpoints(hop.id)]
        if held and header.sha256 not in held:
            raise InvalidInput(
                f"hop {hop.id} already holds uploaded output {held[0]} under this lease; "
                "report it, or let the lease lapse, instead of uploading another"
            )
        where = f"upload for hop {hop.index} of run {run.id}"
        with self.spool.writing(hop.id), self.storage.guard(where):
            partial = self.spool.claim(hop.id, header.lease_token, header.sha256)
            resumable = False
            try:
                received, digest = await self._spool_chunks(partial, header, chunks)
                if received != header.total_size:
                    await asyncio.to_thread(_fsync_file, partial)
                    resumable = True
                    raise InvalidInput(
                        f"upload ended after {received} of {header.total_size} declared bytes; "
                        f"resume from byte {received}"
                    )
                # The hop may have ended while the bytes arrived (lease expired, run aborted).
                run, hop = self.leases.leased_hop(site, header.hop_id, header.lease_token)
                # Checked from the file (bounded reads, off the event loop) while it is made
                # durable; then the spool file itself becomes the stored bundle: the bytes are
                # written once.
                _, inspected = await asyncio.gather(
                    asyncio.to_thread(_fsync_file, partial),
                    asyncio.to_thread(self._inspected_upload, partial, header.sha256, digest),
                )
                bundle = self._checked_upload(run, hop, site, certificate_pem, header, inspected)
                await asyncio.to_thread(self.store.adopt, partial, bundle.sha256)
            except asyncio.CancelledError:
                raise  # a cut stream: kept to resume under the same lease (until the hop ends)
            except BaseException:
                if not resumable:
                    self.spool.discard(hop.id)  # rejected, or storage failed: nothing kept
                raise
            self.spool.discard(hop.id)
            self.ledger.record_checkpoint(
                CheckpointRow(
                    sha256=bundle.sha256,
                    size=bundle.size,
                    run_id=run.id,
                    hop_id=hop.id,
                    producer_site=site,
                    parent_sha256=hop.input_sha256,
                    manifest=json.loads(bundle.manifest.to_json()),
                    tensors=tensor_specs(bundle),
                    signature=header.signature.hex(),
                    producer_certificate=certificate_pem.decode("ascii"),
                    stored_at=datetime.now(UTC),
                )
            )
            async with self._lock:
                with contextlib.suppress(TransitionRefused):
                    self.ledger.transition_hop(
                        hop.id,
                        expected=("leased", "training"),
                        status="uploaded",
                        event="hop.uploaded",
                        payload={"output_sha256": bundle.sha256},
                    )
                self.metrics.hop_phase(hop.id, "committing")
                self.leases.extend(run, hop.id)
        return bundle

    async def _spool_chunks(
        self, partial: Path, header: pb.UploadHeader, chunks: AsyncIterator[bytes]
    ) -> tuple[int, str]:
        """Writes chunks to the partial file as they arrive (a cut upload resumes from there).

        Returns the bytes received and the sha256 of the whole file, hashed while it streamed
        (a resumed upload's earlier bytes are hashed from the file first).
        """
        received = partial.stat().st_size if partial.is_file() else 0
        if header.offset > received:
            raise InvalidInput(
                f"cannot resume at byte {header.offset}: {received} bytes were received"
            )
        with partial.open("r+b" if partial.is_file() else "wb") as fh:
            fh.truncate(header.offset)
            hasher = await asyncio.to_thread(hash_prefix, partial, header.offset)
            fh.seek(header.offset)
            received = header.offset
            # Each chunk is written and hashed on a worker thread while the next one arrives.
            loop = asyncio.get_running_loop()
            pending: asyncio.Future[None] | None = None
            try:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > header.total_size:
                        raise InvalidInput("upload is longer than its header declared")
                    if pending is not None:
                        await pending
                    pending = loop.run_in_executor(None, _absorb, fh, hasher, chunk)
                if pending is not None:
                    await pending
            finally:
                if pending is not None and not pending.done():
                    await asyncio.wait([pending])  # the file stays open until its last write
        self.metrics.checkpoint_bytes.labels(direction="upload").inc(received - header.offset)
        return received, hasher.hexdigest()

    def _inspected_upload(self, partial: Path, expected_sha256: str, digest: str) -> Bundle:
        """The spooled bundle's size, hash, format and values, checked from the file."""
        try:
            return inspect_bundle_file(
                partial,
                expected_sha256=expected_sha256,
                max_bytes=self.max_checkpoint_bytes,
                sha256=digest,
            )
        except CheckpointError as exc:
            raise InvalidInput(str(exc)) from exc

    def _checked_upload(
        self,
        run: RunRow,
        hop: HopRow,
        site: str,
        certificate_pem: bytes,
        header: pb.UploadHeader,
        bundle: Bundle,
    ) -> Bundle:
        """The inspected bundle once its lineage and its producer's signature hold."""
        self._check_lineage(run, hop, site, bundle)
        try:
            verify_custody(
                bundle.sha256, header.signature, certificate_pem, ca_pem=self.ca_pem, producer=site
            )
        except SignatureError as exc:
            raise InvalidInput(f"checkpoint-integrity: {exc}") from exc
        return bundle

    def upload_progress(self, site: str, header: pb.UploadHeader) -> int:
        """Bytes of a hop's upload already received (to resume a cut upload from there)."""
        self.leases.leased_hop(site, header.hop_id, header.lease_token)
        return self.spool.received(header.hop_id, header.lease_token, header.sha256)

    def hop_ended(self, hop_id: str, reason: str) -> None:
        """Frees what a hop that ended (or is redone) leaves: its spool files, its other uploads.

        Best effort under a storage fault: the watchdog's sweep and `baton store gc` finish it.
        """
        try:
            self.spool.discard(hop_id)
            for row in self.ledger.supersede_checkpoints(hop_id, reason):
                self.store.delete(row.sha256)
        except Exception as exc:
            fault = storage_fault_reason(exc)
            if fault is None:
                raise
            self.storage.report(f"clean-up of hop {hop_id}", fault)

    def _check_lineage(self, run: RunRow, hop: HopRow, site: str, bundle: Bundle) -> None:
        manifest = bundle.manifest
        expected = {
            "run_id": run.id,
            "hop_id": hop.id,
            "producer_site": site,
            "parent_sha256": hop.input_sha256 or "",
            "task_type": run.plan["task"],
        }
        for key, value in expected.items():
            if getattr(manifest, key) != value:
                raise InvalidInput(
                    f"checkpoint manifest {key} is {getattr(manifest, key)!r}, expected {value!r}"
                )
        if run.base_model_sha256 and manifest.base_model_sha256 != run.base_model_sha256:
            raise InvalidInput(
                f"checkpoint was trained on base model {manifest.base_model_sha256}, "
                f"the run is pinned to {run.base_model_sha256}"
            )
        parent = self.ledger.checkpoint(hop.input_sha256) if hop.input_sha256 else None
        if parent is not None and sorted(parent.tensors) != tensor_specs(bundle):
            raise InvalidInput(
                "checkpoint tensors (names, dtypes, shapes) differ from the hop's input"
            )

    def sweep_spool(self, runs: list[RunRow]) -> None:
        """Removes spool files whose hop no longer holds that lease (ended, expired, crashed)."""
        live = {
            hop.id: hop.lease_token
            for run in runs
            for hop in run.hops
            if hop.status in LIVE_HOP_STATES and hop.lease_token
        }
        freed = self.spool.sweep(live)
        if freed:
            logger.info("removed %d bytes of abandoned partial uploads", freed)
