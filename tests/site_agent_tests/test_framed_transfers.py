"""The agent's own stub (`SiteStub`) moves bundles as hand-framed chunk messages: a multi-chunk
hand back commits and the next site downloads it (also from a resume point) byte for byte, and a
bad bundle is refused with the very message the generated stub's messages get."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from coordinator import heap
from coordinator.console.admin import AdminClient
from coordinator.server import Coordinator
from protocols.checkpoint import CheckpointManifest, bundle_metadata
from protocols.transport import CHUNK_BYTES, secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from site_agent.agent import SiteAgent
from site_agent.transfers import SiteStub
from tests.conftest import Pki
from tests.coordinator_tests.conftest import BASE, ScriptedSite, admin, coordinator, sites
from tests.site_agent_tests.test_hand_back_agent import (
    _agent,
    _finished,
    _report,
    _task,
    calls,
    older_coordinator,
)

__all__ = ["admin", "calls", "coordinator", "older_coordinator", "sites"]  # fixtures

MiB = 1024 * 1024


def _large_bundle(site: ScriptedSite, task: pb.HopTask, mib: int, value: float = 1.0) -> bytes:
    """A bundle of several chunks (larger than the inline limit: downloaded, not pushed)."""
    manifest = CheckpointManifest(task_type=task.task_type, base_model_sha256=BASE,
                                  run_id=task.run_id, hop_id=task.hop_id,
                                  producer_site=site.name,
                                  parent_sha256=task.input_checkpoint.sha256)  # fmt: skip
    values = np.full((mib * MiB // 8, 2), value, dtype=np.float32)
    values[-1, -1] = 2.0  # the last chunk differs from the others
    return safetensors.numpy.save({"lora_A": values}, metadata=bundle_metadata(manifest, {"r": 4}))


@pytest.fixture
def site_stubs(pki: Pki, coordinator: Coordinator) -> Iterator[dict[str, SiteStub]]:
    channels = {n: secure_channel(f"localhost:{coordinator.port}", pki.tls(n))
                for n in ("site-a", "site-b")}  # fmt: skip
    yield {name: SiteStub(channel) for name, channel in channels.items()}
    for channel in channels.values():
        channel.close()


@dataclass
class HandedBack:
    """A bundle site-a's agent handed back for its first hop, and what the coordinator said."""

    task: pb.HopTask
    data: bytes
    agent: SiteAgent
    reported: tuple[pb.HopResult, pb.HopResultResponse] | None


@pytest.fixture
def hand_back(
    tmp_path: Path, pki: Pki, coordinator: Coordinator, sites: dict[str, ScriptedSite],
    admin: AdminClient, site_stubs: dict[str, SiteStub],
) -> Callable[..., HandedBack]:  # fmt: skip
    """Starts a run and hands its first hop back from site-a's agent: a bundle of `mib` MiB
    of `value`s, through the agent's own stub (framed) or the generated one."""

    def run(mib: int, *, value: float = 1.0, framed: bool = True) -> HandedBack:
        site = sites["site-a"]
        task = _task(admin, site)
        data = _large_bundle(site, task, mib, value)
        agent = _agent(tmp_path, pki, coordinator.port)
        stub = site_stubs["site-a"] if framed else pb_grpc.SiteServiceStub(site.channel)
        reported = _report(agent, stub, task, _finished(agent, site, task, data))
        return HandedBack(task, data, agent, reported)

    return run


def test_a_multi_chunk_hand_back_in_framed_messages_commits_and_downloads_byte_for_byte(
    hand_back: Callable[..., HandedBack], sites: dict[str, ScriptedSite],
    site_stubs: dict[str, SiteStub],
) -> None:  # fmt: skip
    handed = hand_back(5)
    data = handed.data
    assert handed.reported is not None and handed.reported[1].hop_status == "committed"
    ref = sites["site-b"].next_task().input_checkpoint
    assert ref.size == len(data) > 4 * CHUNK_BYTES
    # The next site downloads it in framed chunks, and checks hash and custody as ever.
    assert handed.agent._download(site_stubs["site-b"], ref) == data
    # From a resume point: the chunks say where they start, as protobuf's would.
    resume = 3 * CHUNK_BYTES + 5
    chunks = list(site_stubs["site-b"].DownloadCheckpointFramed(
        pb.DownloadRequest(sha256=ref.sha256, offset=resume), timeout=30))  # fmt: skip
    starts = [offset for _, offset, _ in chunks]
    assert starts == list(range(resume, len(data), CHUNK_BYTES))
    assert {total for _, _, total in chunks} == {len(data)}
    assert b"".join(bytes(view) for view, _, _ in chunks) == data[resume:]


@pytest.mark.parametrize("framed", [True, False], ids=["framed", "generated-stub"])
def test_a_bundle_with_nan_values_is_refused_with_the_same_message_either_way(
    framed: bool, hand_back: Callable[..., HandedBack], coordinator: Coordinator
) -> None:
    handed = hand_back(2, value=float("nan"), framed=framed)
    assert handed.reported is not None
    result, _ = handed.reported
    assert not result.ok and result.error_code == "handback-refused"
    assert result.error_message == (
        "the coordinator refused the hop's bundle: tensor 'lora_A' holds NaN or infinite values"
    )
    assert coordinator.engine.ledger.checkpoints(handed.task.run_id) == []


def test_framed_messages_upload_then_report_to_a_coordinator_that_predates_hand_back(
    older_coordinator: None,
    calls: dict[str, int],
    hand_back: Callable[..., HandedBack],
    coordinator: Coordinator,
) -> None:
    handed = hand_back(2)
    assert handed.reported is not None and handed.reported[1].hop_status == "committed"
    assert calls == {"HandBackHop": 1, "UploadCheckpoint": 1, "ReportHopResult": 1}
    stored = coordinator.engine.store.path(handed.reported[0].output_checkpoint.sha256)
    assert stored.read_bytes() == handed.data


def test_the_coordinator_gives_free_heap_memory_back_once_a_large_transfer_ends(
    monkeypatch: pytest.MonkeyPatch, hand_back: Callable[..., HandedBack],
    sites: dict[str, ScriptedSite], site_stubs: dict[str, SiteStub],
) -> None:  # fmt: skip
    released = threading.Event()
    monkeypatch.setattr(heap, "release_free_memory", released.set)
    monkeypatch.setattr(heap, "QUIET_SECONDS", 0.1)  # not the 5 s a coordinator waits
    handed = hand_back(5)  # 5 MiB up: under the 8 MiB that make a release worth it
    assert handed.reported is not None and handed.reported[1].hop_status == "committed"
    assert not released.wait(0.5)  # well past QUIET_SECONDS: none was scheduled for it
    ref = sites["site-b"].next_task().input_checkpoint
    assert handed.agent._download(site_stubs["site-b"], ref) == handed.data  # and 5 MiB down
    assert released.wait(30)
