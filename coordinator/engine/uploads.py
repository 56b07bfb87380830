"""Hop outputs coming in: resumable upload intake into the spool, lineage and custody checks.

A bundle is hashed and its values checked while it streams into its spool file (size, hash,
format and values are then checked from the header alone: the bytes are never read back), then
checked against the hop's lineage and its producer's signature, before the spool file is renamed
into the store. A hand back (`hand_back`) is an upload whose last message is the hop's result:
the hop is committed in the same call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from coordinator.engine.leases import HopLeases
from coordinator.engine.ledger_writer import LedgerWriter
from coordinator.engine.spool import UploadSpool
from coordinator.engine.tasks import RecentBundles
from coordinator.errors import (
    InvalidInput,
    NotFound,
    PermissionDenied,
    ResumePointLost,
    StorageFault,
)
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
from coordinator.worker_threads import run_to_end, run_whole, settle
from protocols.checkpoint import Bundle, CheckpointError, inspect_bundle
from protocols.checkpoint_stream import BundleStream, inspect_streamed_bundle
from protocols.signing import SignatureError, check_signer, verify_custody
from protocols.transport import CHUNK_BYTES
from protocols.v1 import baton_pb2 as pb

__all__ = ["UploadIntake", "tensor_specs"]

logger = logging.getLogger(__name__)

# While an upload streams, its spool file is made durable behind it: an fdatasync of what was
# written is started on its own thread every this many bytes (one at a time per upload), so the
# fsync before the commit has only the last few MiB left to write and flush.
_SYNC_BYTES = 8 * 1024 * 1024
_READ_BYTES = 4 * 1024 * 1024
# Tensor specs of this many recently stored bundles are kept for the next hops' lineage checks.
_KEPT_TENSORS = 64
CommitResult = Callable[[str, pb.HopResult, CheckpointRow | None], Awaitable[str]]


def tensor_specs(bundle: Bundle) -> list[list[object]]:
    """JSON form of a bundle's tensor specs, as the ledger stores them (sorted by name)."""
    return [[t.name, t.dtype, list(t.shape)] for t in bundle.tensors]


def stored_checkpoint_row(
    *,
    sha256: str,
    size: int,
    run_id: str,
    hop_id: str,
    producer_site: str,
    parent_sha256: str | None,
    manifest: dict[str, Any],
    tensors: list[list[object]],
    signature: str,
    producer_certificate: str,
) -> CheckpointRow:
    """A checked bundle's checkpoint row, as the intake records it: every column given.

    The ORM compiles one INSERT per set of columns given (a column left to its default also
    has its value fetched back), so the start-up rehearsal of a hand back's commit
    (`warm_up`) builds its row here too: the statement it compiles is the one a first hand
    back looks up.
    """
    return CheckpointRow(
        sha256=sha256,
        size=size,
        run_id=run_id,
        hop_id=hop_id,
        producer_site=producer_site,
        parent_sha256=parent_sha256,
        manifest=manifest,
        tensors=tensors,
        signature=signature,
        producer_certificate=producer_certificate,
        stored_at=datetime.now(UTC),
        status="stored",
    )


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Where spool files' bytes are made durable while their uploads stream (`_SpoolWriter`).
_DATA_SYNC_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="upload-sync")


class _SpoolWriter:
    """Appends an upload's chunks to its spool file, in order, on one thread. After a failed
    write it writes nothing more, so the file always holds a prefix of the upload (a cut upload
    resumes from its end).

    Writes go through the page cache. Every `_SYNC_BYTES` an fdatasync of the file is started
    on a `_DATA_SYNC_THREADS` thread, one at a time (the next starts once it has ended and
    covers all written meanwhile): the disk takes the bytes while the next ones arrive, so the
    fsync before the commit finds little left. Durability is still that fsync's alone; a failed
    fdatasync fails the upload (raised by the next `write`, or kept in `failed` by `flush`),
    since the error it took is not reported again to a later fsync.
    """

    def __init__(self, fd: int, offset: int) -> None:
        self.fd = fd
        self.position = offset  # the bytes written
        self.unsynced = offset  # the first byte no fdatasync was started for
        self.failed: OSError | None = None
        self.syncs = 0  # fdatasyncs started
        self._syncing: Future[None] | None = None

    def write(self, chunk: memoryview | bytes) -> None:
        if self.failed is not None:
            raise self.failed
        view = memoryview(chunk)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
            self.position += len(chunk)
            if self.position - self.unsynced >= _SYNC_BYTES:
                self._sync_behind()
        except OSError as exc:
            self.failed = exc
            raise

    def _sync_behind(self) -> None:
        """Starts an fdatasync of the bytes written so far unless one is still running."""
        syncing = self._syncing
        if syncing is not None:
            if not syncing.done():
                return  # the next chunk's write tries again
            self._syncing = None
            syncing.result()  # its failure is the upload's
        self._syncing = _DATA_SYNC_THREADS.submit(os.fdatasync, self.fd)
        self.syncs += 1
        self.unsynced = self.position

    def flush(self) -> None:
        """Waits for the fdatasync in flight (the file may be closed then). Never raises: a
        failure is kept in `failed`."""
        syncing, self._syncing = self._syncing, None
        if syncing is None:
            return
        try:
            syncing.result()
        except OSError as exc:
            if self.failed is None:
                self.failed = exc


# Where a hand back's bundle is made durable in the store beside its commit's SQL
# (`_sync_later`).
_SYNC_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="store-sync")

# Chunks an upload may have waiting for its spool thread (beside the one being written): the
# event loop waits for room past this, so an upload holds at most this many + 2 chunks.
_QUEUED_CHUNKS = 2
# Where uploads' chunks are written and checked. A job drains one upload's queue and ends when
# it is empty, so more uploads than threads only wait their turn.
_SPOOL_THREADS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="upload-spool")


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _SpoolPipe:
    """Hands an upload's chunks from the event loop to a spool thread that writes each one to
    the spool file, then feeds it to the upload's `BundleStream` (hash, values), in order.

    No round trip per chunk: the loop queues a chunk and goes back to receiving the next; a job
    on `_SPOOL_THREADS` is started only when none is draining the queue (when the disk and the
    hash keep up with the network, one per chunk; otherwise one per burst), and the loop is
    woken only when it waits: for room (more than `depth` chunks queued) or for the end
    (`finish`, `settle`). After a failed write or check nothing more is written (the file
    holds a prefix of the upload) and the error is raised by the next `put` or by `finish`.
    """

    def __init__(self, spool: _SpoolWriter, stream: BundleStream, depth: int = _QUEUED_CHUNKS):
        self._loop = asyncio.get_running_loop()
        self._spool = spool
        self._stream = stream
        self._depth = depth
        self._lock = threading.Lock()
        self._chunks: deque[memoryview | bytes] = deque()
        self._draining = False
        self._waiter: asyncio.Future[None] | None = None  # the loop waits for room or the end
        self._until_end = False  # the waiter waits for the end, not for room
        self.jobs = 0  # drain jobs started (one per burst of chunks)
        self.error: BaseException | None = None

    async def put(self, chunk: memoryview | bytes) -> None:
        """Queues `chunk` after the ones before it; waits while the queue is full."""
        waiter = None
        with self._lock:
            if self.error is not None:
                raise self.error
            self._chunks.append(chunk)
            start = not self._draining
            self._draining = True
            if len(self._chunks) > self._depth:
                waiter = self._waiter = self._loop.create_future()
                self._until_end = False
        if start:
            self.jobs += 1
            try:
                _SPOOL_THREADS.submit(self._drain)
            except BaseException:  # shutting down: no job drains, so nothing is waited for
                with self._lock:
                    self._chunks.clear()
                    self._draining = False
                raise
        if waiter is not None:
            await asyncio.shield(waiter)  # `settle` waits for the end if cancelled meanwhile

    async def finish(self) -> None:
        """Waits until every queued chunk is written and checked; raises the first error."""
        await self.settle()
        if self.error is not None:
            raise self.error

    async def settle(self) -> None:
        """Waits until no job drains the queue (even if cancelled meanwhile: the cancellation
        is raised then), so that the spool file can be closed. Raises no write error."""
        cancelled = False
        while True:
            with self._lock:
                if not self._draining:
                    break
                waiter = self._waiter = self._loop.create_future()
                self._until_end = True
            try:
                await asyncio.shield(waiter)
            except asyncio.CancelledError:
                cancelled = True
        if cancelled:
            raise asyncio.CancelledError

    def _drain(self) -> None:
        while True:
            woken = None
            with self._lock:
                if self.error is not None or not self._chunks:
                    self._chunks.clear()  # after a failure nothing more is written
                    self._draining = False
                    woken, self._waiter = self._waiter, None
                    break
                chunk = self._chunks.popleft()
                if self._waiter is not None and not self._until_end:
                    woken, self._waiter = self._waiter, None  # room again
            if woken is not None:
                self._loop.call_soon_threadsafe(_wake, woken)
            try:
                self._spool.write(chunk)
                self._stream.feed(chunk)
            except BaseException as exc:
                with self._lock:
                    self.error = exc
        if woken is not None:
            self._loop.call_soon_threadsafe(_wake, woken)


def _size(path: Path) -> int:
    """Bytes in a partial upload file (0 if there is none)."""
    return path.stat().st_size if path.is_file() else 0


def _open_at(path: Path, offset: int) -> int:
    """The partial upload file open for writing at `offset` (what follows it is dropped)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _feed_file(stream: BundleStream, path: Path, length: int) -> None:
    """Feeds the first `length` bytes of a partial upload to `stream` (a resumed upload)."""
    buffer = bytearray(min(_READ_BYTES, max(length, 1)))
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as fh:
        while length > 0:
            got = fh.readinto(view[: min(len(buffer), length)])
            if not got:
                raise ResumePointLost("the partial upload is shorter than its resume point; "
                                      "upload again from byte 0")  # fmt: skip
            stream.feed(view[:got])
            length -= got


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
        writer: LedgerWriter,
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
        self.writer = writer  # the engine's ledger writes, one at a time in order
        self.ca_pem = ca_pem
        self.max_checkpoint_bytes = max_checkpoint_bytes
        # sha256 -> tensor specs of the bundles this intake checked and stored lately: the
        # next hop's lineage check compares its output with its input's without a query.
        self._kept_tensors: OrderedDict[str, list[list[object]]] = OrderedDict()
        self._kept_lock = threading.Lock()  # written on worker threads, read on the loop
        # The small bundles stored lately, for the next hop's task (no store read on the handoff).
        self.recent_bundles = RecentBundles()
        # sha256 -> the fsync making a placed bundle's name durable, until it succeeded.
        self._syncing: dict[str, Future[None]] = {}
        # Committed hops' clean-ups on the ledger writer's thread, still running (`hop_committed`).
        self._clean_ups: set[asyncio.Future[None]] = set()
        # Hops whose hand back found no stored upload of theirs at its receipt, and of which this
        # intake has recorded no checkpoint row since (but through a hand back's commit): once
        # committed by that hand back, they hold no other upload to supersede (`hop_committed`).
        # Read and written on the event loop only.
        self._sole_uploads: set[str] = set()

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
    ) -> pb.CheckpointRef:
        """Accepts a hop's output bundle: size, hash, signature, format, values and lineage.

        An upload the hop holds already (an answer lost, then resumed at its end) is answered
        with the stored checkpoint: nothing is written again.
        """
        await self._receive(site, certificate_pem, header, chunks, record=True, kept=[])
        return _ref(header)

    async def _receive(
        self,
        site: str,
        certificate_pem: bytes,
        header: pb.UploadHeader,
        chunks: AsyncIterator[bytes],
        *,
        record: bool,
        kept: list[CheckpointRow],
    ) -> CheckpointRow | None:
        """`receive_upload`; with `record` False, the checked bundle is on its way into the
        store (durable once `wait_durable` has returned) and its checkpoint row (and the hop's
        move to "uploaded") is returned, to be written by the hop's commit in the same
        transaction, which waits for it before COMMIT. None: the hop held it already.
        The row is also appended to `kept` as soon as the bundle is in the store, also when
        the call is cancelled or fails afterwards (its caller then records it alone)."""
        run, hop = self.leases.leased_hop(site, header.hop_id, header.lease_token)
        if header.total_size > self.max_checkpoint_bytes:
            raise InvalidInput(
                f"checkpoint of {header.total_size} bytes exceeds the "
                f"{self.max_checkpoint_bytes}-byte cap"
            )
        held = self.ledger.stored_sizes(hop.id)  # sha256 -> size
        if held and header.sha256 not in held:
            raise InvalidInput(
                f"hop {hop.id} already holds uploaded output {next(iter(held))} under this "
                "lease; report it, or let the lease lapse, instead of uploading another"
            )
        if not record and not held:
            self._sole_uploads.add(hop.id)
        stored = held.get(header.sha256)
        if stored is not None and header.offset == stored == header.total_size:
            await _drain(chunks, 0)
            return None
        where = f"upload for hop {hop.index} of run {run.id}"
        with self.spool.writing(hop.id), self.storage.guard(where):
            if header.offset == 0 and header.total_size <= CHUNK_BYTES:
                run, hop, row = await self._store_whole(
                    site, certificate_pem, header, chunks, record, kept
                )
            else:
                run, hop, row = await self._store_spooled(
                    site, certificate_pem, header, chunks, record, kept
                )
            if not record:
                self.metrics.hop_phase(hop.id, "committing")  # the commit writes the row
                return row
            async with self._lock:
                with contextlib.suppress(TransitionRefused):
                    self.ledger.transition_hop(
                        hop.id,
                        expected=("leased", "training"),
                        status="uploaded",
                        event="hop.uploaded",
                        payload={"output_sha256": row.sha256},
                    )
                self.metrics.hop_phase(hop.id, "committing")
                self.leases.extend(run, hop.id)
        return row

    async def _keep(
        self,
        run: RunRow,
        hop: HopRow,
        site: str,
        certificate_pem: bytes,
        header: pb.UploadHeader,
        bundle: Bundle,
        write: Callable[[], object],
        record: bool,
        kept: list[CheckpointRow],
        on_loop: bool = False,
    ) -> CheckpointRow:
        """Writes a checked bundle into the store (`write`, on a worker thread: durable when it
        returns if `record`, else once `wait_durable` has returned), frees its spool files and
        records its checkpoint row (if `record`; else the caller writes the row returned, and
        finds it in `kept` from the moment the bytes are in the store or on their way to it,
        even if this call is then cancelled or fails): run whole even if the stream is cut
        meanwhile, so that bytes in the store always have their row.

        `on_loop`: `write` only hands the bundle to its sync thread (a hand back's bundle in one
        message, `_sync_later`) and the hop has no spool file of this bundle: done on the event
        loop, in one go, without a worker-thread round trip (about 2 ms of a handoff)."""
        row = stored_checkpoint_row(
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
        )

        def write_then_free() -> None:  # one worker-thread call: no second round trip
            write()
            kept.append(row)
            self.spool.discard(hop.id)  # a cut stream's leftovers, if any
            self._remember_tensors(row.sha256, row.tensors)

        if on_loop and not record:
            write_then_free()  # no await: nothing can cut it half done
            return row

        async def keep() -> None:
            await asyncio.to_thread(write_then_free)
            if record:
                self._sole_uploads.discard(hop.id)
                self.ledger.record_checkpoint(row)

        await run_whole(keep())
        return row

    async def record_alone(self, row: CheckpointRow) -> None:
        """Records a stored bundle's checkpoint row (and its hop's move to "uploaded") on its
        own, when the commit that was to write it with the hop did not: bytes in the store keep
        their row. Writes nothing if the row is recorded already.

        On the ledger writer's thread, so after any commit still in flight (one whose caller was
        cancelled: it may yet write the row); a storage error is raised as `StorageFault`.
        """
        copy = CheckpointRow(**{c.key: getattr(row, c.key) for c in CheckpointRow.__table__.c})
        where = f"record of checkpoint {row.sha256} of hop {row.hop_id}"
        async with self._lock:
            with self.storage.guard(where):
                try:
                    recorded_elsewhere = await self.writer.run(self._record_alone_locked, copy)
                finally:
                    # On the loop, once its transaction has ended: a hand back's receipt read
                    # the hop's stored uploads before that, or sees this row.
                    self._sole_uploads.discard(row.hop_id)
                if recorded_elsewhere:
                    await asyncio.to_thread(self.store.delete, row.sha256)

    def _sync_later(self, sha256: str, staged: Path | None = None) -> None:
        """Starts what makes a checked bundle durable in the store, on its own thread: it runs
        beside the commit's SQL, which waits for it (`wait_durable`) before COMMIT. For a
        staged bundle (`staged`, from `CheckpointStore.stage`): the fsync of its bytes, then
        their rename into the store (never the other way round); then, for any bundle just
        named in the store, the fsync of the directory that makes its name durable."""

        def durable() -> None:
            try:
                self.store.place(staged, sha256, sync=False)  # nothing to do for None
            except BaseException:
                self.store.unstage(staged)  # not renamed: nothing is stored
                raise
            self.store.sync_name(sha256)

        syncing = _SYNC_THREADS.submit(durable)
        with self._kept_lock:
            self._syncing[sha256] = syncing

        def synced(done: Future[None]) -> None:
            if done.exception() is None:  # a failed one stays: `wait_durable` tries again
                with self._kept_lock:
                    if self._syncing.get(sha256) is done:
                        del self._syncing[sha256]

        syncing.add_done_callback(synced)

    def wait_durable(self, sha256: str) -> None:
        """Returns once a bundle's bytes and name in the store are durable (blocking: the
        ledger writer's thread, before the COMMIT of the row that refers to it). Raises if they
        cannot be made so.
        """
        with self._kept_lock:
            syncing = self._syncing.get(sha256)
        if syncing is None:
            return  # synced already (or placed with its fsync)
        try:
            syncing.result()
        except OSError:
            if sha256 not in self.store:
                raise  # its bytes never got their name (their fsync failed): nothing to commit
            self.store.sync_name(sha256)  # once more, here: raises if it fails again
        with self._kept_lock:
            if self._syncing.get(sha256) is syncing:
                del self._syncing[sha256]

    def _record_alone_locked(self, row: CheckpointRow) -> bool:
        """`record_alone`'s ledger writes (writer thread). True: the bundle's bytes are to go."""
        try:
            self.wait_durable(row.sha256)  # its name durable before its row
        except OSError:
            if row.sha256 in self.store:
                raise
            return False  # its bytes never got their name (their fsync failed): no row to keep
        hop = self.ledger.hop(row.hop_id)
        if hop is None or hop.status not in LIVE_HOP_STATES:
            # Committed (its commit wrote the row), or ended while its result was checked:
            # then its bytes go, as `hop_ended` frees an ended hop's uploads.
            return self.ledger.checkpoint(row.sha256) is None
        self.ledger.record_checkpoint(row)
        with contextlib.suppress(TransitionRefused, KeyError):
            self.ledger.transition_hop(
                row.hop_id,
                expected=("leased", "training"),
                status="uploaded",
                event="hop.uploaded",
                payload={"output_sha256": row.sha256},
            )
        return False

    async def _record_after_failure(self, row: CheckpointRow) -> None:
        """`record_alone` after a hand back failed, run whole; its own failure is logged, never
        raised (the caller raises the hand back's error: a retryable fault stays retryable)."""
        try:
            await run_whole(self.record_alone(row))
        except Exception as exc:
            reason = str(exc) if isinstance(exc, StorageFault) else type(exc).__name__
            logger.error(
                "checkpoint %s of hop %s stays in the store without its row (%s); a retried "
                "hand back records it",
                row.sha256, row.hop_id, reason,
            )  # fmt: skip

    async def _store_whole(
        self,
        site: str,
        certificate_pem: bytes,
        header: pb.UploadHeader,
        chunks: AsyncIterator[bytes],
        record: bool,
        kept: list[CheckpointRow],
    ) -> tuple[RunRow, HopRow, CheckpointRow]:
        """A bundle that arrives in one message: checked in memory and written once, straight
        into the store (a message arrives whole or not at all: there is nothing to resume)."""
        self.spool.path(header.hop_id, header.lease_token, header.sha256)  # a hex digest
        data = bytearray()
        async for chunk in chunks:
            data += chunk
            if len(data) > header.total_size:
                raise InvalidInput("upload is longer than its header declared")
        if len(data) != header.total_size:
            raise InvalidInput(
                f"upload ended after {len(data)} of {header.total_size} declared bytes; "
                "resume from byte 0"
            )
        self.metrics.checkpoint_bytes.labels(direction="upload").inc(len(data))
        whole = bytes(data)
        # Written (not fsynced) beside the store while it is checked, under no name the store
        # knows: once the checks hold, it is fsynced and renamed into the store (a hand back's
        # on a sync thread beside its commit's SQL, before COMMIT); refused, it is dropped
        # and costs no fsync. Handed to its thread now, ahead of the inspection.
        loop = asyncio.get_running_loop()
        staging = loop.run_in_executor(None, self.store.stage, whole, header.sha256)
        try:
            # On the loop: at most `CHUNK_BYTES` (about 0.4 ms of CPU for a 300 KB adapter),
            # less than a worker thread's round trip on the handoff's path.
            inspected = self._inspected_bytes(whole, header.sha256)
            # The hop may have ended while the bytes arrived (lease expired, run aborted).
            run, hop = self.leases.leased_hop(site, header.hop_id, header.lease_token)
            bundle = self._checked_upload(run, hop, site, certificate_pem, header, inspected)
            staged = await asyncio.shield(staging)
        except BaseException:
            await self._unstage(staging)
            raise

        placing = False  # the staged file is the sync thread's (`_sync_later`)

        def place() -> None:
            nonlocal placing
            if record:  # recorded here alone: bytes and name durable before its row
                self.store.place(staged, bundle.sha256)
            else:
                # A hand back's commit waits for its bytes' fsync, rename and the name's
                # fsync (the name's alone if the store held it), run beside its SQL
                # (`wait_durable` before COMMIT).
                self._sync_later(bundle.sha256, staged)
                placing = True

        try:
            row = await self._keep(run, hop, site, certificate_pem, header, bundle, place,
                                   record, kept, on_loop=True)  # fmt: skip
        except BaseException:
            if not placing:  # else it is stored by its sync thread (and recorded alone)
                await run_to_end(self.store.unstage, staged)  # gone already once placed
            raise
        self.recent_bundles.keep(row.sha256, whole)  # the next hop's task carries it
        return run, hop, row

    async def _unstage(self, staging: asyncio.Future[Path | None]) -> None:
        """Drops what `CheckpointStore.stage` wrote for a refused (or cut) bundle, once it has
        ended; a failed staging has left nothing. Raises a cancellation that came meanwhile."""
        try:
            await settle(staging)
        finally:
            if staging.done() and not staging.cancelled() and staging.exception() is None:
                await run_to_end(self.store.unstage, staging.result())

    async def _store_spooled(
        self,
        site: str,
        certificate_pem: bytes,
        header: pb.UploadHeader,
        chunks: AsyncIterator[bytes],
        record: bool,
        kept: list[CheckpointRow],
    ) -> tuple[RunRow, HopRow, CheckpointRow]:
        """A bundle streamed into its spool file, checked as it arrives, renamed into the store."""
        hop_id = header.hop_id

        def claim() -> Path:
            # The store's least recently used bundles leave the page cache for this one's
            # writes (in the same worker-thread call: no second round trip).
            self.store.make_room(header.total_size - header.offset)
            return self.spool.claim(hop_id, header.lease_token, header.sha256)

        partial = await asyncio.to_thread(claim)
        resumable = False
        try:
            received, stream = await self._spool_chunks(partial, header, chunks)
            if received != header.total_size:
                await asyncio.to_thread(_fsync_file, partial)
                resumable = True
                raise InvalidInput(
                    f"upload ended after {received} of {header.total_size} declared bytes; "
                    f"resume from byte {received}"
                )
            # The hop may have ended while the bytes arrived (lease expired, run aborted).
            run, hop = self.leases.leased_hop(site, header.hop_id, header.lease_token)
            # Checked from the header alone (the values were checked as they streamed in)
            # while the file is made durable; then the spool file itself is renamed into
            # the store: the bytes are written once and never read back.
            _, inspected = await asyncio.gather(
                asyncio.to_thread(_fsync_file, partial),
                asyncio.to_thread(self._inspected_upload, partial, header.sha256, stream),
            )
            bundle = self._checked_upload(run, hop, site, certificate_pem, header, inspected)

            def adopt() -> None:
                # As `_store_whole`'s place: a hand back's commit fsyncs the name beside its
                # SQL; a bundle recorded here alone is durable before its row.
                self.store.adopt(partial, bundle.sha256, sync=record)
                if not record:
                    self._sync_later(bundle.sha256)

            row = await self._keep(run, hop, site, certificate_pem, header, bundle, adopt,
                                   record, kept)  # fmt: skip
        except asyncio.CancelledError:
            raise  # a cut stream: kept to resume under the same lease (until the hop ends)
        except BaseException:
            if not resumable:
                # rejected, or storage failed: nothing kept
                await asyncio.to_thread(self.spool.discard, hop_id)
            raise
        return run, hop, row

    def _inspected_bytes(self, data: bytes, expected_sha256: str) -> Bundle:
        """A bundle's size, hash, format and values, checked in memory."""
        try:
            return inspect_bundle(
                data, expected_sha256=expected_sha256, max_bytes=self.max_checkpoint_bytes
            )
        except CheckpointError as exc:
            raise InvalidInput(str(exc)) from exc

    async def hand_back(
        self,
        site: str,
        certificate_pem: bytes,
        header: pb.UploadHeader,
        parts: AsyncIterator[pb.HandBackRequest],
        commit: CommitResult,
    ) -> str:
        """Stores a finished hop's bundle and commits the hop with the result that follows it.

        The bundle is received and checked exactly as an upload (`receive_upload`) and made
        durable in the store, then the result goes through `commit` (the engine's one commit
        path) with the bundle's checkpoint row: the row, the hop's "uploaded" and "committed"
        states and the next hop's lease are one ledger transaction (one durable commit, the
        events chained one by one). A hand back that fails (or is cut) once its bundle is in
        the store still leaves the bundle recorded, as an upload (`record_alone`, after any
        commit in flight); if that fails too (a full disk), it is logged and the hand back's
        own error is raised, so a storage fault stays retryable. A retry after a lost answer,
        for a hop committed with this very bundle, writes nothing and is answered "committed"
        again. Returns the hop's status.
        """
        results: list[pb.HopResult] = []

        async def chunks() -> AsyncIterator[bytes]:
            async for part in parts:
                kind = part.WhichOneof("part")
                if kind == "data":
                    yield part.data
                elif kind == "result":
                    results.append(part.result)
                    return
                else:
                    raise InvalidInput("only data chunks, then the hop result, may follow the "
                                       "hand back header")  # fmt: skip

        # The bundle's row once it is in the store (set even if the stream is cut right then).
        stored: list[CheckpointRow] = []
        try:
            if self._committed_with(site, header):
                await _drain(chunks(), header.total_size - header.offset)
            else:
                await self._receive(
                    site, certificate_pem, header, chunks(), record=False, kept=stored
                )
            if not results:
                raise InvalidInput(
                    "a hand back ends with the hop's result and none came; the bundle is "
                    "stored: hand the hop back again (from its end) or report its result"
                )
            if await anext(parts, None) is not None:
                raise InvalidInput("nothing may follow the hop result of a hand back")
            result = results[0]
            _check_hand_back_result(header, result)
            result.output_checkpoint.CopyFrom(_ref(header))
            return await commit(site, result, stored[0] if stored else None)
        except BaseException:
            if stored:
                await self._record_after_failure(stored[0])
            raise  # the hand back's own error, whatever became of the clean-up

    def _committed_with(self, site: str, header: pb.UploadHeader) -> bool:
        """Whether `site`'s hop is committed already, with the bundle this header names.

        A hop of a running run is read as the engine holds it (written through by every
        commit); only another hop is looked up in SQL."""
        held = self.leases.runs.hop(header.hop_id)
        hop = held[1] if held is not None else self.ledger.hop(header.hop_id)
        return (
            hop is not None
            and hop.site == site
            and hop.status == "committed"
            and hop.output_sha256 == header.sha256
        )

    async def _spool_chunks(
        self, partial: Path, header: pb.UploadHeader, chunks: AsyncIterator[bytes]
    ) -> tuple[int, BundleStream]:
        """Writes chunks to the partial file as they arrive (a cut upload resumes from there).

        Returns the bytes received and the stream that hashed the whole file and checked its
        values as it arrived (a resumed upload's earlier bytes are fed to it from the file first).
        """
        received = await asyncio.to_thread(_size, partial)
        if header.offset > received:
            raise ResumePointLost(
                f"cannot resume at byte {header.offset}: {received} bytes were received; "
                "upload again from byte 0"
            )
        stream = BundleStream()
        fd = await run_to_end(_open_at, partial, header.offset, undo=os.close)
        try:
            if header.offset:
                await asyncio.to_thread(_feed_file, stream, partial, header.offset)
            received = header.offset
            # Each chunk is written, then hashed and value-checked, on a spool thread while the
            # next ones arrive (`_SpoolPipe`: in order, no round trip per chunk). A cancelled
            # handler never detaches from a write (below).
            writer = _SpoolWriter(fd, header.offset)
            pipe = _SpoolPipe(writer, stream)
            try:
                async for chunk in chunks:
                    received += len(chunk)
                    if received > header.total_size:
                        raise InvalidInput("upload is longer than its header declared")
                    await pipe.put(chunk)
                await pipe.finish()
            finally:
                await pipe.settle()  # the file stays open until its last write
                await run_to_end(writer.flush)  # no fdatasync still uses the file
            if writer.failed is not None:
                raise writer.failed
        finally:
            os.close(fd)
        self.metrics.checkpoint_bytes.labels(direction="upload").inc(received - header.offset)
        return received, stream

    def _inspected_upload(
        self, partial: Path, expected_sha256: str, stream: BundleStream
    ) -> Bundle:
        """The spooled bundle's size, hash, format and values, from its header and `stream`."""
        try:
            return inspect_streamed_bundle(
                partial,
                stream,
                expected_sha256=expected_sha256,
                max_bytes=self.max_checkpoint_bytes,
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

    def check_signer_ahead(self, certificate_pem: bytes) -> None:
        """Checks a site's certificate as its bundles' signer, with no bundle (at its hello).

        A producer's certificate is parsed and checked against the CA once per certificate
        (`protocols.signing.check_signer` keeps the answer): without this, each site's first
        hand back paid for it on the handoff (0.4-0.9 ms on an idle host, a cold cluster's
        first four handoffs). A certificate the CA did not issue is not kept and is refused
        at a hand back.
        """
        with contextlib.suppress(SignatureError):
            check_signer(certificate_pem, ca_pem=self.ca_pem)

    def upload_progress(self, site: str, header: pb.UploadHeader) -> int:
        """Bytes of a hop's upload already received (to resume a cut upload from there).

        All of them once the bundle is stored for the hop (also after its commit: a hand back
        whose answer was lost is resumed at its end and answered "committed").
        """
        if self._committed_with(site, header):
            return header.total_size
        self.leases.leased_hop(site, header.hop_id, header.lease_token)
        size = self.ledger.stored_sizes(header.hop_id).get(header.sha256)
        if size is not None:
            return size
        return self.spool.received(header.hop_id, header.lease_token, header.sha256)

    def hop_ended(self, hop_id: str, reason: str) -> None:
        """Frees what a hop that ended (or is redone) leaves: its spool files, its other uploads.

        Best effort under a storage fault: the watchdog's sweep and `baton store gc` finish it.
        """
        self._sole_uploads.discard(hop_id)
        with self._best_effort(hop_id):
            self.spool.discard(hop_id)
            self._supersede(hop_id, reason)

    def hop_committed(self, hop_id: str) -> None:
        """`hop_ended` for a hop just committed, off its hand back's answer: its spool files go
        now; its other stored uploads (none, but for a second upload under the same lease) are
        superseded and their bytes freed on the ledger writer's thread, after the commit and
        before any later ledger write (one transaction less between a commit and its answer).
        A failure is logged (the watchdog's sweep and `baton store gc` finish it).

        A hop committed by a hand back that found no stored upload of it at its receipt, and
        of which no other checkpoint row was recorded since (`_sole_uploads`), holds none:
        no transaction then (a writer-thread job and about 1.5 ms of CPU per handoff)."""
        with self._best_effort(hop_id):
            self.spool.discard(hop_id)
        if hop_id in self._sole_uploads:
            self._sole_uploads.discard(hop_id)
            return
        clean_up = asyncio.ensure_future(self.writer.run(self._supersede_committed, hop_id))
        self._clean_ups.add(clean_up)
        clean_up.add_done_callback(self._clean_up_ended)

    def _supersede(self, hop_id: str, reason: str) -> None:
        """Supersedes a hop's stored uploads other than its output and frees their bytes."""
        for row in self.ledger.supersede_checkpoints(hop_id, reason):
            self.store.delete(row.sha256)

    def _supersede_committed(self, hop_id: str) -> None:
        """`_supersede` of a committed hop (on the ledger writer's thread)."""
        with self._best_effort(hop_id):
            self._supersede(hop_id, "hop committed with another output")

    @contextlib.contextmanager
    def _best_effort(self, hop_id: str) -> Iterator[None]:
        """A clean-up of `hop_id`: a storage fault is reported, not raised."""
        try:
            yield
        except Exception as exc:
            fault = storage_fault_reason(exc)
            if fault is None:
                raise
            self.storage.report(f"clean-up of hop {hop_id}", fault)

    def _clean_up_ended(self, clean_up: asyncio.Future[None]) -> None:
        self._clean_ups.discard(clean_up)
        if not clean_up.cancelled() and (exc := clean_up.exception()) is not None:
            logger.error("clean-up of a committed hop failed: %s", exc, exc_info=exc)

    async def settle_clean_ups(self) -> None:
        """Waits for the committed hops' clean-ups handed to the ledger writer so far."""
        if self._clean_ups:
            await asyncio.gather(*self._clean_ups, return_exceptions=True)

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
        parent = self._parent_tensors(hop.input_sha256) if hop.input_sha256 else None
        if parent is not None and sorted(parent) != tensor_specs(bundle):
            raise InvalidInput(
                "checkpoint tensors (names, dtypes, shapes) differ from the hop's input"
            )

    def _remember_tensors(self, sha256: str, tensors: list[list[object]]) -> None:
        with self._kept_lock:
            self._kept_tensors[sha256] = tensors
            self._kept_tensors.move_to_end(sha256)
            while len(self._kept_tensors) > _KEPT_TENSORS:
                self._kept_tensors.popitem(last=False)

    def _parent_tensors(self, sha256: str) -> list[list[object]] | None:
        """A hop input's tensor specs: as this intake stored that bundle (checked, and the
        same bytes whatever row names them), else from its checkpoint row (an aggregate, a
        bundle stored before a restart); None if there is no such row."""
        with self._kept_lock:
            known = self._kept_tensors.get(sha256)
        if known is not None:
            return known
        row = self.ledger.checkpoint(sha256)
        return None if row is None else list(row.tensors)

    def sweep_spool(self, runs: list[RunRow]) -> None:
        """Removes spool files whose hop no longer holds that lease (ended, expired, crashed)."""
        _, freed = self.spool.sweep(_live_leases(runs))
        if freed:
            logger.info("removed %d bytes of abandoned partial uploads", freed)

    def sweep_at_start(self, runs: list[RunRow], before: float) -> None:
        """What an earlier coordinator left when it stopped mid-write (a crash, a kill): the
        store's temporary files from before `before` (a `time.time()` taken before serving,
        so none is this process's) and partial uploads no live lease of `runs` holds (a live
        lease's stays: its upload resumes). Logs how many went; a failure is logged, not
        raised (the watchdog sweeps the spool again, the next start the store)."""
        try:
            temporary, temporary_bytes = self.store.sweep_temporary(before)
            partial, partial_bytes = self.spool.sweep(_live_leases(runs))
        except OSError as exc:
            logger.warning("start-up: could not sweep stale files of the store or spool: %s", exc)
            return
        if temporary or partial:
            logger.info(
                "start-up: removed %d stale temporary files (%d bytes) from the checkpoint "
                "store and %d abandoned partial uploads (%d bytes) from the upload spool",
                temporary, temporary_bytes, partial, partial_bytes,
            )  # fmt: skip


def _live_leases(runs: list[RunRow]) -> dict[str, str]:
    """Hop id -> lease token of every live hop of `runs` that holds a lease."""
    return {
        hop.id: hop.lease_token
        for run in runs
        for hop in run.hops
        if hop.status in LIVE_HOP_STATES and hop.lease_token
    }


def _ref(header: pb.UploadHeader) -> pb.CheckpointRef:
    return pb.CheckpointRef(
        sha256=header.sha256, size=header.total_size, signature=header.signature
    )


async def _drain(chunks: AsyncIterator[bytes], allowed: int) -> None:
    """Reads what a client sends of a bundle the coordinator holds already (nothing is kept)."""
    async for chunk in chunks:
        allowed -= len(chunk)
        if allowed < 0:
            raise InvalidInput("upload is longer than its header declared")


def _check_hand_back_result(header: pb.UploadHeader, result: pb.HopResult) -> None:
    """A hand back's result is the successful result of the hop its header names."""
    if result.hop_id != header.hop_id or result.lease_token != header.lease_token:
        raise InvalidInput("the hand back's result names another hop or lease than its header")
    if not result.ok or result.released:
        raise InvalidInput(
            "a hand back carries a successful hop's result; report a failed or released hop "
            "with ReportHopResult"
        )
    named = result.output_checkpoint.sha256
    if named and named != header.sha256:
        raise InvalidInput(
            f"the hand back's result names output {named}; its bundle is {header.sha256}"
        )
