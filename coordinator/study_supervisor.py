"""Study workers the coordinator runs for the dashboard: `baton study start` child processes.

A worker is the CLI itself, started with an admin certificate the coordinator was given for
this (`study_admin_certificate`/`study_admin_key`), so it drives its runs through the admin gRPC
API exactly as an operator's terminal would: the supervisor adds no second path that writes run
state. It records each worker in the ledger's database (`study_workers`) and every start, stop
request and exit as a ledger event naming who asked. A worker outlives a coordinator restart
(it reconnects, as the CLI does); the next coordinator marks it orphaned: still stoppable by
its process id (checked against the process's start time), no longer watched for its exit code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from sqlalchemy import select

from coordinator.errors import InvalidInput, NotFound
from coordinator.ledger import Ledger, StudyWorkerRow
from coordinator.study_request import StopMode, StudyRequest

__all__ = ["WORKER_STATES", "StudySupervisor", "StudyWorker", "StudyWorkerCredentials"]

logger = logging.getLogger(__name__)

# running: supervised; stopping: asked to stop; finished: exit 0; failed: exit != 0 unasked;
# stopped: ended after a stop request; orphaned: started by an earlier coordinator process.
WORKER_STATES = ("running", "stopping", "finished", "failed", "stopped", "orphaned")
LIVE_STATES = ("running", "stopping", "orphaned")


@dataclass(frozen=True)
class StudyWorkerCredentials:
    """How a worker reaches the coordinator's admin API."""

    coordinator: str  # host:port
    ca_certificate: Path
    certificate: Path  # an admin certificate (`baton pki issue admin`)
    private_key: Path


@dataclass(frozen=True)
class StudyWorker:
    """One worker as the dashboard shows it."""

    id: str
    study: str
    status: str
    pid: int | None
    alive: bool
    started_by: str
    started_at: datetime
    stop_mode: str | None
    stopped_by: str | None
    ended_at: datetime | None
    exit_code: int | None
    log_tail: str


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime | None) -> datetime | None:
    return value if value is None or value.tzinfo is not None else value.replace(tzinfo=UTC)


def _process(pid: int | None, started_at: float | None) -> psutil.Process | None:
    """The live process `pid` if it is still the one recorded (pids are reused)."""
    if pid is None or started_at is None:
        return None
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - started_at) > 1.0:
            return None
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process
    except psutil.Error:
        return None


def _tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


class StudySupervisor:
    """Starts, stops and watches study workers; one per coordinator process."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        database_url: str,
        credentials: StudyWorkerCredentials | None,
        log_dir: Path,
        python: str = sys.executable,
        env: Mapping[str, str] | None = None,
        kill_after: float = 60.0,
    ) -> None:
        """Builds a supervisor (start no worker yet; call `adopt_orphans` once at start-up).

        Args:
            ledger: The coordinator's ledger (worker rows and events).
            database_url: The ledger's URL; studies are stored beside it (`study_storage_url`).
            credentials: The admin identity workers use (None: studies cannot be started).
            log_dir: Where each worker's output goes (`<id>.log`).
            python: The interpreter that runs `python -m coordinator study start`.
            env: Extra environment for the workers.
            kill_after: After an abort-trial stop, SIGKILL a worker still alive this much later.
        """
        self.ledger = ledger
        self.database_url = database_url
        self.credentials = credentials
        self.log_dir = log_dir
        self.python = python
        self.env = dict(env or {})
        self.kill_after = kill_after
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    # ---- reading ------------------------------------------------------------------------------

    def workers(self, study: str | None = None, *, limit: int = 50) -> list[StudyWorker]:
        """Workers newest first (of one study, or all)."""
        query = select(StudyWorkerRow).order_by(StudyWorkerRow.started_at.desc()).limit(limit)
        if study is not None:
            query = query.where(StudyWorkerRow.study == study)
        with self.ledger.transaction() as db:
            rows = list(db.scalars(query))
        return [self._view(row) for row in rows]

    def worker(self, worker_id: str) -> StudyWorker:
        with self.ledger.transaction() as db:
            row = db.get(StudyWorkerRow, worker_id)
            if row is None:
                raise NotFound(f"no study worker {worker_id!r}")
            return self._view(row)

    def active(self, study: str) -> StudyWorker | None:
        """The study's worker that has not ended, if any."""
        return next((w for w in self.workers(study) if w.status in LIVE_STATES and w.alive), None)

    def _view(self, row: StudyWorkerRow) -> StudyWorker:
        alive = _process(row.pid, row.process_started_at) is not None and row.ended_at is None
        return StudyWorker(
            id=row.id, study=row.study, status=row.status, pid=row.pid, alive=alive,
            started_by=row.started_by, started_at=_aware(row.started_at) or _now(),
            stop_mode=row.stop_mode, stopped_by=row.stopped_by, ended_at=_aware(row.ended_at),
            exit_code=row.exit_code, log_tail=_tail(row.log_path),
        )  # fmt: skip

    # ---- starting -----------------------------------------------------------------------------

    def refusal(self) -> str | None:
        """Why this coordinator cannot start studies, or None."""
        if self.credentials is None:
            return (
                "this coordinator has no admin certificate for study workers: set "
                "study_admin_certificate and study_admin_key (a `baton pki issue admin` pair)"
            )
        return None

    def _storage_url(self) -> str:
        # Imports Optuna: only when a study starts, never on the serve path.
        from coordinator.console.study import study_storage_url

        try:
            return study_storage_url(self.database_url)
        except ValueError as exc:
            raise InvalidInput(f"no study storage beside this ledger: {exc}") from exc

    def start(self, request: StudyRequest, *, by: str) -> StudyWorker:
        """Launches `baton study start` for a checked request (see `prepare_search`).

        Raises:
            InvalidInput: Studies cannot be started here, or the study already has a live worker.
        """
        refusal = self.refusal()
        if refusal is not None:
            raise InvalidInput(refusal)
        assert self.credentials is not None
        storage_url = self._storage_url()
        with self._lock:
            live = self.active(request.name)
            if live is not None:
                raise InvalidInput(
                    f"study {request.name!r} is already running (worker {live.id}, pid {live.pid})"
                )
            worker_id = uuid.uuid4().hex
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{worker_id}.log"
            # Secrets and the storage URL (which may hold a database password) go through the
            # environment, never the command line that `ps` shows.
            env = {
                **os.environ,
                **self.env,
                "BATON_STUDY_STORAGE": storage_url,
                "BATON_COORDINATOR": self.credentials.coordinator,
                "BATON_ADMIN_CA": str(self.credentials.ca_certificate),
                "BATON_ADMIN_CERT": str(self.credentials.certificate),
                "BATON_ADMIN_KEY": str(self.credentials.private_key),
                "PYTHONUNBUFFERED": "1",
                "COLUMNS": "160",
            }
            argv = [self.python, "-m", "coordinator", "study", "start", *request.to_argv(),
                    "--log-level", "INFO"]  # fmt: skip
            with log_path.open("wb") as log:
                child = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True,  # Ctrl-C on the coordinator is not for it
                )  # fmt: skip
            try:
                created = psutil.Process(child.pid).create_time()
            except psutil.Error:
                created = None
            now = _now()
            with self.ledger.transaction() as db:
                db.add(
                    StudyWorkerRow(
                        id=worker_id, study=request.name, status="running", pid=child.pid,
                        process_started_at=created, options=request.model_dump(mode="json"),
                        started_by=by, started_at=now, log_path=str(log_path),
                    )
                )  # fmt: skip
                self.ledger.append_event(
                    db, "study.started",
                    payload={"study": request.name, "worker": worker_id, "pid": child.pid,
                             "trials": request.trials, "sites": request.sites, "by": by},
                )  # fmt: skip
            self._children[worker_id] = child
        threading.Thread(
            target=self._watch_child, args=(worker_id, child), name=f"study-{worker_id[:8]}",
            daemon=True,
        ).start()  # fmt: skip
        logger.info("study %s started by %s (worker %s, pid %d)", request.name, by, worker_id,
                    child.pid)  # fmt: skip
        return self.worker(worker_id)

    # ---- stopping -----------------------------------------------------------------------------

    def stop(self, study: str, mode: StopMode, *, by: str) -> StudyWorker:
        """Asks the study's live worker to stop (`mode`: after its trial, or aborting it).

        Raises:
            NotFound: The study has no live worker.
        """
        with self._lock:
            live = self.active(study)
            if live is None:
                raise NotFound(f"study {study!r} has no running worker")
            with self.ledger.transaction() as db:
                row = db.get(StudyWorkerRow, live.id)
                assert row is not None
                process = _process(row.pid, row.process_started_at)
                if process is None:
                    raise NotFound(f"study {study!r} has no running worker")
                if row.status != "orphaned":
                    row.status = "stopping"
                row.stop_mode = mode.value
                row.stopped_by = by
                self.ledger.append_event(
                    db, "study.stop-requested",
                    payload={"study": study, "worker": live.id, "mode": mode.value, "by": by},
                )  # fmt: skip
            # Signalled once the request is committed, so the exit is recorded as "stopped"; a
            # worker that ended meanwhile is recorded by its watcher all the same.
            with contextlib.suppress(psutil.Error):
                process.send_signal(mode.signal)
        # (An orphan's exit is watched by pid since `adopt_orphans`.)
        if mode is StopMode.ABORT_TRIAL:
            threading.Thread(target=self._kill_later, args=(live.id, process),
                             daemon=True).start()  # fmt: skip
        logger.info("study %s: stop (%s) requested by %s", study, mode.value, by)
        return self.worker(live.id)

    def _kill_later(self, worker_id: str, process: psutil.Process) -> None:
        if self._gone(process, self.kill_after):
            return
        logger.warning("study worker %s ignored its stop for %.0f s: killed", worker_id,
                       self.kill_after)  # fmt: skip
        with contextlib.suppress(psutil.Error):
            process.kill()

    @staticmethod
    def _gone(process: psutil.Process, timeout: float | None) -> bool:
        """Waits until `process` is gone (or a zombie), polling: never reaping it, which is the
        child watcher's job; an orphan's zombie may never be reaped by a container's init."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            started = process.create_time()
        except psutil.Error:
            return True
        while _process(process.pid, started) is not None:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.5)
        return True

    # ---- watching -----------------------------------------------------------------------------

    def _watch_child(self, worker_id: str, child: subprocess.Popen[bytes]) -> None:
        code = child.wait()
        self._children.pop(worker_id, None)
        self._ended(worker_id, code)

    def _watch_orphan(self, worker_id: str, process: psutil.Process) -> None:
        self._gone(process, None)
        self._ended(worker_id, None)

    def _ended(self, worker_id: str, code: int | None) -> None:
        try:
            with self.ledger.transaction() as db:
                row = db.get(StudyWorkerRow, worker_id)
                if row is None or row.ended_at is not None:
                    return
                if row.stop_mode is not None:
                    status = "stopped"
                elif row.status == "orphaned":
                    status = "orphaned"
                else:
                    status = "finished" if code == 0 else "failed"
                row.status = status
                row.exit_code = code
                row.ended_at = _now()
                self.ledger.append_event(
                    db, "study.ended",
                    payload={"study": row.study, "worker": worker_id, "status": status,
                             "exit_code": code},
                )  # fmt: skip
        except Exception:  # a closed ledger at shutdown; the next start marks it orphaned
            logger.exception("could not record the end of study worker %s", worker_id)
            return
        logger.info("study worker %s ended: %s (exit %s)", worker_id, status, code)

    def adopt_orphans(self) -> list[str]:
        """Marks workers a previous coordinator process started as orphaned (at start-up).

        Returns:
            The orphaned workers' ids.
        """
        orphaned: list[str] = []
        watch: list[tuple[str, psutil.Process]] = []
        with self.ledger.transaction() as db:
            rows = db.scalars(
                select(StudyWorkerRow).where(
                    StudyWorkerRow.status.in_(("running", "stopping")),
                    StudyWorkerRow.ended_at.is_(None),
                )
            )
            for row in rows:
                if row.id in self._children:
                    continue
                process = _process(row.pid, row.process_started_at)
                row.status = "orphaned"
                if process is None:
                    row.ended_at = _now()
                else:
                    watch.append((row.id, process))
                self.ledger.append_event(
                    db, "study.orphaned",
                    payload={"study": row.study, "worker": row.id, "pid": row.pid,
                             "alive": process is not None},
                )  # fmt: skip
                orphaned.append(row.id)
        for worker_id, process in watch:
            threading.Thread(target=self._watch_orphan, args=(worker_id, process),
                             daemon=True).start()  # fmt: skip
        return orphaned
