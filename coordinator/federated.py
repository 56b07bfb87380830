"""A round's aggregate, committed: read the contributions, aggregate, sign, store, ledger.

The bytes are read from the checkpoint store (never from a site), aggregated by Flower's strategy
(`coordinator.aggregation`), written back as a bundle signed with the coordinator's key, and
recorded with the round in one ledger event (`round.aggregated`). FedAdam and FedYogi's server
state after the round is a second stored blob the same event names: the next round, after any
restart, reads exactly it. A crash between the store write and the event leaves only unnamed
bytes (`baton store gc` removes them); the round is aggregated again from the same inputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from coordinator.aggregation import (
    AggregationError,
    Contribution,
    aggregate_bundle,
    aggregate_round,
    read_tensors,
)
from coordinator.ledger import CheckpointRow, HopRow, Ledger, RoundRow, RunRow
from coordinator.plan import RunPlan
from coordinator.rounds import DEADLINE_CODE, contributions, previous_output
from coordinator.store import CheckpointStore
from protocols.checkpoint import AGGREGATOR, CheckpointError, CheckpointManifest, inspect_bundle
from protocols.signing import sign_digest

__all__ = ["AggregateSigner", "RoundShort", "commit_round"]


class RoundShort(AggregationError):
    """A round ended with fewer contributions than its plan's min_sites."""


@dataclass(frozen=True)
class AggregateSigner:
    """The coordinator's key and certificate, which vouch for the aggregates it makes."""

    private_key_pem: bytes
    certificate_pem: bytes

    def sign(self, sha256: str) -> str:
        return sign_digest(self.private_key_pem, sha256).hex()


def _checkpoint_row(
    sha256: str, size: int, run: RunRow, row: RoundRow, signer: AggregateSigner, **fields: Any
) -> CheckpointRow:
    return CheckpointRow(sha256=sha256, size=size, run_id=run.id, hop_id=row.id,
                         producer_site=AGGREGATOR, parent_sha256=row.input_sha256,
                         signature=signer.sign(sha256),
                         producer_certificate=signer.certificate_pem.decode("ascii"),
                         stored_at=datetime.now(UTC), **fields)  # fmt: skip


def commit_round(
    ledger: Ledger,
    store: CheckpointStore,
    signer: AggregateSigner,
    run: RunRow,
    rounds: list[RoundRow],
    row: RoundRow,
    hops: Mapping[str, HopRow],
) -> RoundRow:
    """Aggregates a round whose members are all done and commits the result.

    Raises:
        RoundShort: Fewer contributions than `federated.min_sites` (the round cannot aggregate).
        AggregationError: Contributions that do not fit together.
        TransitionRefused: The round was aggregated already (by an earlier call).
    """
    plan = RunPlan.model_validate(run.plan)
    spec = plan.federated
    if spec is None:
        raise AggregationError(f"run {run.id} is sequential: it has no rounds")
    found = contributions(row, hops)
    if found is None:
        raise AggregationError(f"round {row.number} still has members training")
    if len(found) < spec.min_sites:
        raise RoundShort(
            f"round {row.number} has {len(found)} contribution(s), fewer than min_sites "
            f"{spec.min_sites}"
        )
    inputs = []
    first_bundle = None
    for item in found:
        data = store.read(item.sha256)
        if first_bundle is None:
            first_bundle = inspect_bundle(data, expected_sha256=item.sha256)
        inputs.append(
            Contribution(item.name, item.sha256, read_tensors(data), item.examples, item.metrics)
        )
    assert first_bundle is not None  # min_sites >= 1
    current = read_tensors(store.read(row.input_sha256)) if row.input_sha256 else None
    before = [r for r in rounds if r.number < row.number and r.status == "aggregated"]
    state_sha = before[-1].server_state_sha256 if before else None
    if row.input_sha256 != previous_output(rounds, row):
        raise AggregationError(f"round {row.number}'s input is not the aggregate before it")
    aggregate = aggregate_round(
        spec,
        row.number,
        inputs,
        current=current,
        server_state=store.read(state_sha) if state_sha else None,
    )
    manifest = CheckpointManifest(
        task_type=plan.task,
        base_model_sha256=first_bundle.manifest.base_model_sha256,
        run_id=run.id,
        hop_id=row.id,
        producer_site=AGGREGATOR,
        parent_sha256=row.input_sha256 or "",
        created_at=row.started_at.isoformat() if row.started_at else "",
        parents=tuple(sorted({item.sha256 for item in found})),
    )
    data = aggregate_bundle(aggregate, manifest, first_bundle.adapter_config)
    try:
        bundle = inspect_bundle(data)
    except CheckpointError as exc:
        raise AggregationError(f"round {row.number}'s aggregate is no valid bundle: {exc}") from exc
    store.put(data)
    rows = [
        _checkpoint_row(
            bundle.sha256, bundle.size, run, row, signer,
            manifest=json.loads(bundle.manifest.to_json()),
            tensors=[[t.name, t.dtype, list(t.shape)] for t in bundle.tensors],
        )
    ]  # fmt: skip
    new_state_sha = None
    if aggregate.server_state is not None:
        new_state_sha = store.put(aggregate.server_state)
        rows.append(
            _checkpoint_row(
                new_state_sha, len(aggregate.server_state), run, row, signer,
                manifest={"server_state": spec.strategy, "round": row.number},
                tensors=[],
            )
        )  # fmt: skip
    return ledger.finish_round(
        row.id,
        checkpoints=rows,
        output_sha256=bundle.sha256,
        server_state_sha256=new_state_sha,
        contributions=[[item.name, item.sha256, item.examples] for item in found],
        dropped=[
            [name, "round deadline"]
            for name, ids in row.members
            if any(hops[i].status == "skipped" and hops[i].error_code == DEADLINE_CODE for i in ids)
        ],
        metrics=aggregate.metrics,
    )
