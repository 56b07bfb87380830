"""The next hop's task goes on its site's stream the moment the transaction leasing it commits:
not after what the writer thread does next (the head observers after the engine's: a signed
head's signature and fsync), nor only if the hand back's own call lives on. Real mTLS gRPC."""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable

import grpc
import pytest

from coordinator.server import Coordinator
from protocols.v1 import baton_pb2 as pb
from tests.coordinator_tests.conftest import WAIT, ScriptedSite
from tests.coordinator_tests.test_hand_back import _bundle, _hand_back, _header, _result, site, task

__all__ = ["site", "task"]  # fixtures

_whole = functools.partial(_hand_back, whole=True)

# How long a blocked head observer waits for the next task: without the push on commit, the task
# waits for the observer, which gives up then (below the hand back's own 15 s deadline).
PUSH_WAIT = 10.0


class _HeldObserver:
    """A head observer after the engine's (where the head signer sits) that holds the writer
    thread, on the transaction leasing a hop, until `site` holds its next task (or gives up)."""

    def __init__(self, site: ScriptedSite) -> None:
        self.site = site
        self.held: list[pb.Task | None] = []  # the task `site` got meanwhile (None: none came)
        self.on_commit: list[Callable[[], object]] = []  # called first (a client gives up)
        self.done = threading.Event()

    def __call__(self, _seq: int, _hash: str, kinds: tuple[str, ...]) -> None:
        if "hop.leased" not in kinds or self.held:
            return
        for call in self.on_commit:
            call()
        try:
            self.held.append(self.site.tasks.get(timeout=PUSH_WAIT))
        except queue.Empty:
            self.held.append(None)
        self.done.set()


def test_the_next_site_holds_its_task_before_the_observers_after_the_commit_return(
    sites: dict[str, ScriptedSite], site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator
) -> None:
    ledger = coordinator.engine.ledger
    observer = _HeldObserver(sites["site-b"])
    ledger.head_observers.append(observer)
    try:
        assert _whole(site, task, _bundle(site, task, 75_000)) == "committed"
    finally:
        ledger.head_observers.remove(observer)
    assert observer.held != [None], "the next task waited for the writer thread's observers"
    [pushed] = observer.held
    assert pushed is not None and pushed.WhichOneof("kind") == "hop"
    leased = ledger.hop(pushed.hop.hop_id)
    assert leased is not None and leased.status == "leased"
    assert pushed.hop.lease_token == leased.lease_token  # the lease the transaction committed
    assert pushed.hop.input_checkpoint.sha256 == ledger.hop(task.hop_id).output_sha256
    assert coordinator.engine.hops.leases.sent[leased.id].site == "site-b"
    assert sites["site-b"].tasks.empty()  # sent once


def test_a_hand_back_given_up_by_its_site_during_the_commit_still_hands_the_run_on(
    sites: dict[str, ScriptedSite], site: ScriptedSite, task: pb.HopTask, coordinator: Coordinator
) -> None:
    ledger = coordinator.engine.ledger
    observer = _HeldObserver(sites["site-b"])
    data = _bundle(site, task, 75_000)
    request = pb.HandBackWhole(header=_header(site, task, data), bundle=data, result=_result(task))
    call = site.stub.HandBackHopWhole.future(request, timeout=15)
    observer.on_commit.append(call.cancel)  # the site gives up as its hop commits
    ledger.head_observers.append(observer)
    try:
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
        assert observer.done.wait(WAIT)  # the commit's writer thread runs on past the call
    finally:
        ledger.head_observers.remove(observer)
    hop = ledger.hop(task.hop_id)
    assert hop is not None and hop.status == "committed"  # committed all the same
    [pushed] = observer.held
    assert pushed is not None, "the committed hop's next task went nowhere"
    # The next site trains and hands its hop back under the lease it was pushed.
    second = pushed.hop
    site_b = sites["site-b"]
    assert _whole(site_b, second, _bundle(site_b, second, 75_000)) == "committed"
