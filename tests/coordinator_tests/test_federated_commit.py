"""A round's aggregate is committed from stored contributions: signed, parented, ledgered once."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from coordinator.federated import AggregateSigner, RoundShort, commit_round
from coordinator.ledger import CheckpointRow, Ledger, TransitionRefused
from coordinator.plan import parse_plan
from coordinator.rounds import DEADLINE_CODE, round_rows
from coordinator.store import CheckpointStore
from protocols.checkpoint import AGGREGATOR, CheckpointManifest, bundle_metadata, inspect_bundle
from protocols.signing import verify_aggregate_custody
from tests.conftest import Pki

PLAN = {"dataset": "heart", "task": "tabular", "labels": ["0", "1"], "mode": "federated",
        "sites": ["site-a", "site-b", "site-c"]}  # fmt: skip


@pytest.fixture
def ledger(sqlite_ledger_url: str) -> Iterator[Ledger]:
    ledger = Ledger(sqlite_ledger_url)
    ledger.migrate()
    yield ledger
    ledger.close()


def _signer(pki: Pki) -> AggregateSigner:
    tls = pki.tls("coordinator")
    return AggregateSigner(tls.private_key.read_bytes(), tls.certificate.read_bytes())


class _Run:
    """A federated run in a real ledger and store, its hops committed by hand."""

    def __init__(self, ledger: Ledger, store: CheckpointStore, **federated: object) -> None:
        self.ledger, self.store = ledger, store
        self.plan = parse_plan({**PLAN, "federated": {"rounds": 2, **federated}})
        self.run_id = "f" * 32
        hops, rounds = round_rows(self.plan, self.run_id)
        ledger.create_run(self.run_id, "fed", json.loads(self.plan.to_json()), hops, None,
                          rounds=rounds)  # fmt: skip

    def state(self):  # type: ignore[no-untyped-def]
        run = self.ledger.run(self.run_id)
        return run, self.ledger.rounds(self.run_id), {h.id: h for h in run.hops}

    def train(self, number: int, values: dict[str, float], examples: dict[str, float]) -> None:
        run, rounds, hops = self.state()
        row = rounds[number - 1]
        if row.status == "pending":
            before = rounds[number - 2].output_sha256 if number > 1 else None
            row = self.ledger.start_round(row.id, before)
        for name, ids in row.members:
            hop = hops[ids[0]]
            if name not in values:
                self.ledger.transition_hop(
                    hop.id, expected=("pending",), status="skipped", event="hop.skipped",
                    error_code=DEADLINE_CODE,
                )  # fmt: skip
                continue
            manifest = CheckpointManifest(task_type="tabular", base_model_sha256="",
                                          run_id=run.id, hop_id=hop.id, producer_site=name,
                                          parent_sha256=row.input_sha256 or "")  # fmt: skip
            tensors = {"w": np.full((2, 3), values[name], np.float32)}
            data = safetensors.numpy.save(tensors, metadata=bundle_metadata(manifest, {"k": 1}))
            sha = self.store.put(data)
            self.ledger.lease_hop(hop.id, "tok", row.input_sha256)
            self.ledger.record_checkpoint(
                CheckpointRow(sha256=sha, size=len(data), run_id=run.id, hop_id=hop.id,
                              producer_site=name, parent_sha256=row.input_sha256,
                              manifest=json.loads(manifest.to_json()),
                              tensors=[["w", "F32", [2, 3]]],
                              stored_at=datetime.now(UTC))
            )  # fmt: skip
            self.ledger.commit_hop(hop.id, lease_token="tok", output_sha256=sha,
                                   metrics={"train_examples": examples[name], "train_loss": 1.0},
                                   train_started_at_ns=1, train_finished_at_ns=2,
                                   base_model_sha256="")  # fmt: skip

    def commit(self, signer: AggregateSigner, number: int):  # type: ignore[no-untyped-def]
        run, rounds, hops = self.state()
        return commit_round(self.ledger, self.store, signer, run, rounds, rounds[number - 1], hops)


def test_a_rounds_aggregate_is_signed_parented_and_weighted_by_examples(
    ledger: Ledger, tmp_path: Path, pki: Pki
) -> None:
    store = CheckpointStore(tmp_path / "store")
    run = _Run(ledger, store)
    run.train(1, {"site-a": 1.0, "site-b": 2.0, "site-c": 4.0}, {"site-a": 10, "site-b": 30,
                                                                 "site-c": 60})  # fmt: skip
    row = run.commit(_signer(pki), 1)
    assert row.status == "aggregated" and [c[2] for c in row.contributions] == [10.0, 30.0, 60.0]
    data = store.read(str(row.output_sha256))
    bundle = inspect_bundle(data)
    assert bundle.manifest.producer_site == AGGREGATOR and bundle.manifest.hop_id == row.id
    assert bundle.manifest.parents == tuple(sorted(c[1] for c in row.contributions))
    np.testing.assert_allclose(safetensors.numpy.load(data)["w"], (10 + 60 + 240) / 100)
    checkpoint = ledger.checkpoint(bundle.sha256)
    assert checkpoint is not None
    verify_aggregate_custody(bundle.sha256, bytes.fromhex(checkpoint.signature),
                             checkpoint.producer_certificate.encode(),
                             ca_pem=pki.tls("coordinator").ca_certificate.read_bytes())  # fmt: skip
    with pytest.raises(TransitionRefused, match="round 1 is aggregated"):
        run.commit(_signer(pki), 1)
    # Round 2 trains from round 1's aggregate and names it as its parent.
    run.train(2, {"site-a": 0.0, "site-b": 0.0, "site-c": 0.0}, {"site-a": 1, "site-b": 1,
                                                                 "site-c": 1})  # fmt: skip
    second = run.commit(_signer(pki), 2)
    assert inspect_bundle(store.read(str(second.output_sha256))).manifest.parent_sha256 == (
        row.output_sha256
    )
    assert ledger.verify().ok


def test_fedadam_state_is_stored_and_a_crash_before_the_event_is_aggregated_again_once(
    ledger: Ledger, tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = CheckpointStore(tmp_path / "store")
    run = _Run(ledger, store, strategy="fedadam")
    run.train(1, {"site-a": 1.0, "site-b": 2.0, "site-c": 3.0},
              {"site-a": 1, "site-b": 1, "site-c": 1})  # fmt: skip
    first = run.commit(_signer(pki), 1)
    assert first.server_state_sha256 is None  # round 1 from fresh adapters: FedAvg
    run.train(2, {"site-a": 0.5, "site-b": 1.0, "site-c": 1.5},
              {"site-a": 1, "site-b": 2, "site-c": 3})  # fmt: skip
    finish = ledger.finish_round

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("killed before the ledger event")

    monkeypatch.setattr(ledger, "finish_round", crash)
    with pytest.raises(OSError):
        run.commit(_signer(pki), 2)
    assert ledger.rounds(run.run_id)[1].status == "training"  # nothing recorded
    monkeypatch.setattr(ledger, "finish_round", finish)
    second = run.commit(_signer(pki), 2)
    assert second.server_state_sha256 is not None and second.server_state_sha256 in store
    state = ledger.checkpoint(second.server_state_sha256)
    assert state is not None and state.manifest == {"server_state": "fedadam", "round": 2}
    kinds = [e.kind for e in ledger.events(run.run_id)]
    assert kinds.count("round.aggregated") == 2
    assert ledger.verify().ok


def test_a_round_short_of_min_sites_is_refused_and_nothing_is_written(
    ledger: Ledger, tmp_path: Path, pki: Pki
) -> None:
    store = CheckpointStore(tmp_path / "store")
    run = _Run(ledger, store, min_sites=2)
    run.train(1, {"site-a": 1.0}, {"site-a": 10})
    before = len(ledger.events())
    with pytest.raises(RoundShort, match=r"1 contribution\(s\), fewer than min_sites 2"):
        run.commit(_signer(pki), 1)
    assert len(ledger.events()) == before and ledger.rounds(run.run_id)[0].status == "training"
