"""Admin client: what the `baton` CLI and the demo use to talk to a running coordinator."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from coordinator.plan import RunPlan
from protocols.transport import TlsFiles, secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc

__all__ = ["AdminClient", "handoff_seconds"]

TERMINAL_RUN_STATES = ("completed", "failed", "aborted")


@dataclass
class AdminClient:
    """A connection to the coordinator's AdminService with an admin certificate."""

    target: str
    tls: TlsFiles
    server_name: str | None = None

    def __post_init__(self) -> None:
        self._channel = secure_channel(self.target, self.tls, server_name=self.server_name)
        self._stub = pb_grpc.AdminServiceStub(self._channel)

    @classmethod
    def from_files(cls, target: str, ca: Path, cert: Path, key: Path) -> AdminClient:
        return cls(target, TlsFiles(ca, cert, key))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_run(self, plan: RunPlan, timeout: float = 30, *, allow_offline: bool = False) -> str:
        """Starts a run; refused (FAILED_PRECONDITION, one problem per line) by preflight."""
        request = pb.StartRunRequest(plan_json=plan.to_json(), allow_offline=allow_offline)
        response: pb.StartRunResponse = self._stub.StartRun(request, timeout=timeout)
        return response.run_id

    def run(self, run_id: str, timeout: float = 30) -> pb.RunStatus:
        status: pb.RunStatus = self._stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=timeout)
        return status

    def evaluate_run(
        self, run_id: str, split: str = "validation", sites: list[str] | None = None
    ) -> list[str]:
        request = pb.EvaluateRunRequest(run_id=run_id, split=split, sites=sites or [])
        response: pb.EvaluateRunResponse = self._stub.EvaluateRun(request, timeout=30)
        return list(response.evaluation_ids)

    def wait_for_evaluations(self, run_id: str, timeout: float) -> pb.RunStatus:
        """Blocks until no evaluation of the run is pending; returns the run's status."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.run(run_id)
            if all(e.status != "pending" for e in run.evaluations):
                return run
            if time.monotonic() > deadline:
                raise TimeoutError(f"evaluations of run {run_id} did not finish in {timeout} s")
            time.sleep(0.1)

    def collect_statistics(
        self,
        dataset: str,
        task_type: str,
        sites: list[str],
        *,
        min_count: int = 0,
        noise_std: float = 0.0,
        expires_in_seconds: float = 0.0,
        cv_folds: int = 0,
    ) -> pb.StatisticsStatus:
        """Asks sites for aggregate statistics; min_count and expires_in_seconds 0 take the
        coordinator's defaults; cv_folds > 1 asks for per-fold normalisers too (tabular)."""
        request = pb.CollectStatisticsRequest(
            dataset=dataset,
            task_type=task_type,
            sites=sites,
            min_count=min_count,
            noise_std=noise_std,
            expires_in_seconds=expires_in_seconds,
            cv_folds=cv_folds,
        )
        status: pb.StatisticsStatus = self._stub.CollectStatistics(request, timeout=30)
        return status

    def statistics(self, statistics_id: str, timeout: float = 30) -> pb.StatisticsStatus:
        request = pb.GetStatisticsRequest(statistics_id=statistics_id)
        status: pb.StatisticsStatus = self._stub.GetStatistics(request, timeout=timeout)
        return status

    def wait_for_statistics(self, statistics_id: str, timeout: float) -> pb.StatisticsStatus:
        """Blocks until the statistics request is done or failed; returns its status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.statistics(statistics_id)
            if status.status != "pending":
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"statistics {statistics_id} did not finish in {timeout} s")
            time.sleep(0.1)

    def control(self, run_id: str, action: str, reason: str = "") -> pb.RunStatus:
        """`resume` or `abort` a run."""
        request = pb.RunControlRequest(run_id=run_id, reason=reason)
        call = self._stub.ResumeRun if action == "resume" else self._stub.AbortRun
        status: pb.RunStatus = call(request, timeout=30)
        return status

    def revoke(self, serial: str, reason: str) -> int:
        """Revokes a certificate by serial (hex); returns how many open streams were closed."""
        request = pb.RevokeRequest(serial=serial, reason=reason)
        response: pb.RevokeResponse = self._stub.RevokeCertificate(request, timeout=30)
        return response.closed_streams

    def runs(self, timeout: float = 30) -> list[pb.RunStatus]:
        return list(self._stub.ListRuns(pb.ListRunsRequest(), timeout=timeout).runs)

    def sites(self, timeout: float = 30) -> list[pb.SiteStatus]:
        return list(self._stub.ListSites(pb.ListSitesRequest(), timeout=timeout).sites)

    def download_final_checkpoint(self, run_id: str, timeout: float = 600) -> bytes:
        """A completed run's final checkpoint bundle; resumes after a dropped connection."""
        buffer = bytearray()
        for attempt in range(5):
            request = pb.DownloadFinalCheckpointRequest(run_id=run_id, offset=len(buffer))
            try:
                for chunk in self._stub.DownloadFinalCheckpoint(request, timeout=timeout):
                    if chunk.offset != len(buffer):
                        raise ValueError("final checkpoint chunks arrived out of order")
                    buffer.extend(chunk.data)
                return bytes(buffer)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == 4:
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def wait_for_sites(self, names: set[str], timeout: float) -> None:
        """Blocks until every named site has an open task stream."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                connected = {s.name for s in self.sites(timeout=5) if s.connected}
            except grpc.RpcError:
                connected = set()
            if names <= connected:
                return
            if time.monotonic() > deadline:
                missing = ", ".join(sorted(names - connected))
                raise TimeoutError(f"site(s) did not connect within {timeout:.0f} s: {missing}")
            time.sleep(0.2)


def handoff_seconds(run: pb.RunStatus) -> list[float]:
    """End of each hop's training to start of the next hop's training (site clocks)."""
    hops = sorted(run.hops, key=lambda h: h.index)
    return [
        (nxt.train_started_at_ns - cur.train_finished_at_ns) / 1e9
        for cur, nxt in itertools.pairwise(hops)
        if cur.train_finished_at_ns and nxt.train_started_at_ns
    ]
