"""What sites report about their approvals, between the wire form and `SiteApprovals`.

A site reports at hello which bundles it approved and its policy's rules; `baton sites` and a
search's preflight read them back from `ListSites`.
"""

from __future__ import annotations

from coordinator.preflight import SiteApprovals, SiteView
from protocols.approval import ApprovalRule
from protocols.v1 import baton_pb2 as pb

__all__ = ["approval_rule", "report_approvals", "site_approvals"]


def approval_rule(message: pb.ApprovalRule) -> ApprovalRule:
    """A policy rule as a site reported it (an older site's rule lists no strategies: any)."""
    return ApprovalRule(
        task_types=frozenset(message.task_types),
        datasets=frozenset(message.datasets),
        base_models=frozenset(message.base_models),
        max_values=dict(message.max_values),
        modes=frozenset(message.modes) or frozenset({"sequential"}),
        strategies=frozenset(message.strategies) or frozenset({"*"}),
    )


def report_approvals(report: pb.SiteApprovalReport, view: SiteView | None) -> None:
    """Fills `report` from what the coordinator knows of a site's approvals."""
    approvals = view.approvals if view is not None else None
    if approvals is None:
        return
    report.reported = True
    report.approved_bundles.extend(sorted(approvals.bundles))
    report.by_policy = approvals.by_policy
    report.not_required = approvals.not_required
    for rule in approvals.rules:
        report.rules.add(
            task_types=sorted(rule.task_types), datasets=sorted(rule.datasets),
            base_models=sorted(rule.base_models), modes=sorted(rule.modes),
            strategies=sorted(rule.strategies), max_values=dict(rule.max_values),
        )  # fmt: skip


def site_approvals(report: pb.SiteApprovalReport) -> SiteApprovals | None:
    """The approvals a `ListSites` entry reports (None: not reported since the coordinator
    started)."""
    if not report.reported:
        return None
    return SiteApprovals(
        bundles=frozenset(report.approved_bundles),
        by_policy=report.by_policy,
        not_required=report.not_required,
        rules=tuple(approval_rule(rule) for rule in report.rules),
    )
