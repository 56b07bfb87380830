"""The agent hands a finished hop back in one call (a small bundle in one message), reports a
refused bundle as the hop's failure, streams to a coordinator without the one-message call and
still hands back in two calls (upload, then result) to a coordinator that predates both."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import site_agent.transfers
from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from coordinator.servicer import SiteServicer
from protocols.checkpoint import sha256_hex
from protocols.signing import sign_digest
from protocols.transport import secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from site_agent.agent import SiteAgent
from site_agent.hop_runner import _Heartbeat
from site_agent.settings import SiteSettings
from tests.conftest import Pki
from tests.coordinator_tests.conftest import ScriptedSite, admin, coordinator, sites

__all__ = ["admin", "coordinator", "sites"]  # fixtures


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the coordinator's upload, result and hand-back calls."""
    counted: dict[str, int] = {}
    for name in ("UploadCheckpoint", "ReportHopResult", "HandBackHop", "HandBackHopWhole"):
        original = getattr(SiteServicer, name)

        def counting(self: Any, request: Any, context: Any, _o: Any = original, _n: str = name):  # type: ignore[no-untyped-def]
            counted[_n] = counted.get(_n, 0) + 1
            return _o(self, request, context)

        monkeypatch.setattr(SiteServicer, name, counting)
    return counted


async def _unknown(self: Any, request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")


@pytest.fixture
def older_coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator without HandBackHop (nor HandBackHopWhole) answers UNIMPLEMENTED, as gRPC
    does for any unknown rpc."""
    monkeypatch.setattr(SiteServicer, "HandBackHop", _unknown)
    monkeypatch.setattr(SiteServicer, "HandBackHopWhole", _unknown)


@pytest.fixture
def streaming_coordinator(monkeypatch: pytest.MonkeyPatch) -> None:
    """A coordinator with HandBackHop but without HandBackHopWhole."""
    monkeypatch.setattr(SiteServicer, "HandBackHopWhole", _unknown)


def _agent(tmp_path: Path, pki: Pki, port: int) -> SiteAgent:
    (tmp_path / "data").mkdir()
    return SiteAgent(SiteSettings(
        coordinator=f"localhost:{port}", ca_certificate=pki.directory / "ca.crt",
        certificate=pki.directory / "site-a.crt", private_key=pki.directory / "site-a.key",
        data_dir=tmp_path / "data", result_retry_seconds=5,
    ))  # fmt: skip


@pytest.fixture
def stub(pki: Pki, coordinator: Coordinator) -> Iterator[pb_grpc.SiteServiceStub]:
    with secure_channel(f"localhost:{coordinator.port}", pki.tls("site-a")) as channel:
        yield pb_grpc.SiteServiceStub(channel)


def _task(admin: AdminClient, site: ScriptedSite) -> pb.HopTask:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan({
        "name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": ["site-a", "site-b"],
        "failure": {"retry_backoff_seconds": 0, "max_retries": 1},
    }))  # fmt: skip
    return site.next_task()


def _finished(agent: SiteAgent, site: ScriptedSite, task: pb.HopTask, data: bytes) -> pb.HopResult:
    """What `_train_hop` leaves for `_report_hop_result`: the bundle to hand back, the result."""
    digest = sha256_hex(data)
    header = pb.UploadHeader(hop_id=task.hop_id, lease_token=task.lease_token,
                             total_size=len(data), sha256=digest,
                             signature=sign_digest(site.key_pem, digest))  # fmt: skip
    agent._handing_back = (header, data)
    return pb.HopResult(hop_id=task.hop_id, lease_token=task.lease_token, ok=True,
                        metrics={"accuracy": 0.5}, train_started_at_ns=1, train_finished_at_ns=2,
                        output_checkpoint=pb.CheckpointRef(sha256=digest, size=len(data),
                                                           signature=header.signature))  # fmt: skip


def _report(
    agent: SiteAgent, stub: pb_grpc.SiteServiceStub, task: pb.HopTask, result: pb.HopResult
) -> tuple[pb.HopResult, pb.HopResultResponse] | None:
    agent.site_name = "site-a"
    return agent._report_hop_result(stub, task, result, _Heartbeat(stub, task, 1.0))


@dataclasses.dataclass(frozen=True)
class _LeasedHop:
    """site-a's lease of a run's first hop, and an agent of site-a to hand it back over `stub`."""

    coordinator: Coordinator
    site: ScriptedSite
    task: pb.HopTask
    agent: SiteAgent
    stub: pb_grpc.SiteServiceStub

    def finished(self, data: bytes | None = None) -> pb.HopResult:
        """`_finished` with `data`, by default a good bundle of the hop."""
        bundle = self.site.bundle(self.task) if data is None else data
        return _finished(self.agent, self.site, self.task, bundle)

    def report(self, result: pb.HopResult) -> tuple[pb.HopResult, pb.HopResultResponse] | None:
        return _report(self.agent, self.stub, self.task, result)


@pytest.fixture
def hop(
    tmp_path: Path, pki: Pki, coordinator: Coordinator, sites: dict[str, ScriptedSite],
    admin: AdminClient, stub: pb_grpc.SiteServiceStub,
) -> _LeasedHop:  # fmt: skip
    site = sites["site-a"]
    task = _task(admin, site)
    return _LeasedHop(coordinator, site, task, _agent(tmp_path, pki, coordinator.port), stub)


def test_a_finished_hop_is_handed_back_in_one_call(calls: dict[str, int], hop: _LeasedHop) -> None:
    reported = hop.report(hop.finished())
    assert reported is not None and reported[1].hop_status == "committed"
    assert calls == {"HandBackHopWhole": 1}  # a small bundle: one message
    assert hop.coordinator.engine.ledger.hop(hop.task.hop_id).status == "committed"  # type: ignore[union-attr]


def test_a_bundle_over_the_one_message_size_is_streamed(
    calls: dict[str, int], hop: _LeasedHop, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = hop.site.bundle(hop.task)
    monkeypatch.setattr(site_agent.transfers, "WHOLE_HAND_BACK_BYTES", len(data) - 1)
    reported = hop.report(hop.finished(data))
    assert reported is not None and reported[1].hop_status == "committed"
    assert calls == {"HandBackHop": 1}


def test_a_site_streams_its_hand_back_to_a_coordinator_without_the_one_message_call(
    streaming_coordinator: None, calls: dict[str, int], hop: _LeasedHop
) -> None:
    reported = hop.report(hop.finished())
    assert reported is not None and reported[1].hop_status == "committed"
    assert calls == {"HandBackHopWhole": 1, "HandBackHop": 1}
    # Known from then on: the next hand back streams at once.
    assert hop.agent._whole_unimplemented and not hop.agent._hand_back_unimplemented


def test_a_site_hands_back_in_two_calls_to_a_coordinator_that_predates_hand_back(
    older_coordinator: None, calls: dict[str, int], hop: _LeasedHop
) -> None:
    reported = hop.report(hop.finished())
    assert reported is not None and reported[1].hop_status == "committed"
    assert calls == {
        "HandBackHopWhole": 1, "HandBackHop": 1, "UploadCheckpoint": 1, "ReportHopResult": 1
    }  # fmt: skip
    # Known from then on: the next hand back goes straight to the two calls.
    assert hop.agent._hand_back_unimplemented


def test_a_bundle_the_coordinator_refuses_is_reported_as_the_hops_failure(hop: _LeasedHop) -> None:
    task, ledger = hop.task, hop.coordinator.engine.ledger
    foreign = hop.site.bundle(task, hop_id="0" * 32)  # lineage of another hop
    reported = hop.report(hop.finished(foreign))
    assert reported is not None
    result, response = reported
    assert not result.ok and result.error_code == "handback-refused"
    assert result.error_message.startswith(
        "the coordinator refused the hop's bundle: checkpoint manifest hop_id is"
    )
    assert response.hop_status == "pending"  # the failure policy retries the hop at once
    refused = ledger.hop(task.hop_id)
    assert refused is not None and refused.error_code == "handback-refused"
    assert ledger.checkpoints(task.run_id) == []
    retried = hop.site.next_task()
    assert retried.hop_id == task.hop_id and retried.lease_token != task.lease_token


def test_a_hand_back_the_coordinator_cannot_resume_starts_again_from_byte_0(
    calls: dict[str, int], hop: _LeasedHop
) -> None:
    result = hop.finished()
    header, data = hop.agent._handing_back  # type: ignore[misc]
    # Resumed at a point the coordinator no longer holds (it restarted without the partial).
    header.offset = len(data) // 2
    reported = hop.report(result)
    assert reported is not None and reported[1].hop_status == "committed"
    assert calls == {"HandBackHopWhole": 2}
    assert hop.coordinator.engine.ledger.hop(hop.task.hop_id).status == "committed"  # type: ignore[union-attr]


def test_an_upload_the_older_coordinator_cannot_resume_starts_again_from_byte_0(
    older_coordinator: None, calls: dict[str, int], hop: _LeasedHop
) -> None:
    hop.agent._hand_back_unimplemented = True
    result = hop.finished()
    header, data = hop.agent._handing_back  # type: ignore[misc]
    header.offset = len(data) // 2
    reported = hop.report(result)
    assert reported is not None and reported[1].hop_status == "committed"
    assert calls == {"HandBackHopWhole": 1, "UploadCheckpoint": 2, "ReportHopResult": 1}


def test_a_refused_result_of_a_stored_bundle_is_not_reported_as_a_refused_bundle(
    hop: _LeasedHop,
) -> None:
    ledger = hop.coordinator.engine.ledger
    result = hop.finished()
    result.metrics["accuracy"] = float("nan")
    # Logged and left to the lease, as a refused ReportHopResult: the hop does not fail.
    assert hop.report(result) is None
    stored = ledger.hop(hop.task.hop_id)
    assert stored is not None and stored.status == "uploaded" and not stored.error_code
    assert [row.sha256 for row in ledger.checkpoints(hop.task.run_id)] == [
        result.output_checkpoint.sha256
    ]
