"""Rounds of federated and hybrid runs, as pure decisions over ledger rows.

A round's members (a federated run's sites; a hybrid run's groups) each train a chain of hops from
the round's input: a federated member's chain is one hop, a hybrid group's is its sites in order.
Which hops may be leased now, from which checkpoint, when a round is complete and what it
aggregates are decided here from the rows alone; the engine does the writing.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.ledger.models import HopRow, RoundRow, RunRow
from coordinator.plan import RunPlan
from protocols.v1 import baton_pb2 as pb

__all__ = [
    "DEADLINE_CODE",
    "MemberProgress",
    "RoundContribution",
    "contributions",
    "current_round",
    "leasable_hops",
    "member_progress",
    "previous_output",
    "round_rows",
    "round_statuses",
    "stragglers",
]

SETTLED = ("committed", "skipped")
EXAMPLES_METRIC = "train_examples"  # every hop reports what it trained on (site_agent tasks)
# The error code of hops skipped because their member missed the round's deadline ("drop").
DEADLINE_CODE = "round-deadline"


def round_rows(plan: RunPlan, run_id: str) -> tuple[list[HopRow], list[RoundRow]]:
    """Every hop and round of a federated or hybrid run, created with the run.

    Each round trains `spec.sample_size(members)` of the plan's members, drawn by a generator
    seeded with the plan's `federated.seed` and the round number (so a run's selection is fixed
    when it is created, and the same plan selects the same members), in plan order.
    """
    spec = plan.federated
    if spec is None:
        raise ValueError("a sequential run has no rounds")
    hp = plan.round_hyperparameters().model_dump()
    hops: list[HopRow] = []
    rounds: list[RoundRow] = []
    for number, selected in enumerate(plan.round_selection(), start=1):
        listing: list[list[Any]] = []
        for name, chain in selected:
            ids = []
            for site in chain:
                hop = HopRow(id=uuid.uuid4().hex, index=len(hops), site=site,
                             hyperparameters=dict(hp), status="pending", metrics={})  # fmt: skip
                hops.append(hop)
                ids.append(hop.id)
            listing.append([name, ids])
        rounds.append(
            RoundRow(
                id=uuid.uuid4().hex,
                run_id=run_id,
                number=number,
                status="pending",
                members=listing,
                contributions=[],
                dropped=[],
                metrics={},
            )
        )
    return hops, rounds


def current_round(rounds: Sequence[RoundRow]) -> RoundRow | None:
    """The first round not yet aggregated (a failed round stops the run), or None when all are."""
    return next((r for r in rounds if r.status != "aggregated"), None)


def previous_output(rounds: Sequence[RoundRow], row: RoundRow) -> str | None:
    """A round's input: the aggregate of the round before it (None for the first round)."""
    before = [r for r in rounds if r.number < row.number and r.status == "aggregated"]
    return before[-1].output_sha256 if before else None


@dataclass(frozen=True)
class MemberProgress:
    """Where one member's chain stands within its round."""

    name: str
    hops: tuple[HopRow, ...]
    next_hop: HopRow | None  # the first unsettled hop; None when the chain is done
    next_input: str | None  # what that hop trains from
    dropped: bool = False

    @property
    def done(self) -> bool:
        return self.next_hop is None or self.dropped


def member_progress(row: RoundRow, hops: Mapping[str, HopRow]) -> list[MemberProgress]:
    """Each member's chain: its next hop and that hop's input (the last committed output
    before it in the chain, else the round's input; skipped hops pass their input on). A member
    with a hop skipped for the round's deadline is dropped: it contributes nothing."""
    progress = []
    for name, ids in row.members:
        chain = tuple(hops[i] for i in ids)
        current = row.input_sha256
        next_hop = None
        for hop in chain:
            if hop.status == "committed":
                current = hop.output_sha256
            elif hop.status != "skipped":
                next_hop = hop
                break
        dropped = any(h.status == "skipped" and h.error_code == DEADLINE_CODE for h in chain)
        progress.append(MemberProgress(str(name), chain, next_hop, current, dropped))
    return progress


def leasable_hops(row: RoundRow, hops: Mapping[str, HopRow]) -> list[tuple[HopRow, str | None]]:
    """The hops to dispatch now (one per member still training), each with its input."""
    if row.status != "training":
        return []
    return [
        (member.next_hop, member.next_input)
        for member in member_progress(row, hops)
        if member.next_hop is not None and not member.dropped
    ]


@dataclass(frozen=True)
class RoundContribution:
    """A member's output for the round's aggregate."""

    name: str
    sha256: str
    examples: float
    metrics: dict[str, float] = field(default_factory=dict)


def contributions(row: RoundRow, hops: Mapping[str, HopRow]) -> list[RoundContribution] | None:
    """The round's contributions once every member is done (None while one still trains).

    A member contributes its chain's last committed output, weighted by the examples every
    committed hop of its chain trained on; a member whose hops were all skipped, or that was
    dropped, contributes nothing.
    """
    progress = member_progress(row, hops)
    if not all(member.done for member in progress):
        return None
    found = []
    for member in progress:
        committed = [h for h in member.hops if h.status == "committed"]
        if member.dropped or not committed:
            continue
        last = committed[-1]
        examples = sum(float(h.metrics.get(EXAMPLES_METRIC, 0.0)) for h in committed)
        metrics = {k: float(v) for k, v in last.metrics.items() if isinstance(v, int | float)}
        found.append(RoundContribution(member.name, str(last.output_sha256), examples, metrics))
    return found


def stragglers(row: RoundRow, hops: Mapping[str, HopRow]) -> list[MemberProgress]:
    """The members still training (for the deadline's wait, drop or abort)."""
    return [m for m in member_progress(row, hops) if not m.done]


def round_statuses(run: RunRow, rounds: Sequence[RoundRow]) -> list[pb.RoundStatus]:
    """The admin view of a run's rounds (empty for a sequential run)."""
    index = {h.id: h.index for h in run.hops}
    statuses = []
    for row in rounds:
        status = pb.RoundStatus(
            number=row.number,
            status=row.status,
            input_sha256=row.input_sha256 or "",
            output_sha256=row.output_sha256 or "",
            dropped=[str(name) for name, _ in row.dropped],
            error=row.error or "",
        )
        for name, ids in row.members:
            status.members.add(name=str(name), hop_indices=[index[i] for i in ids if i in index])
        for name, sha, examples in row.contributions:
            status.contributions.add(member=str(name), sha256=str(sha), examples=float(examples))
        status.metrics.update({k: float(v) for k, v in row.metrics.items()})
        statuses.append(status)
    return statuses
