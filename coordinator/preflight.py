"""Preflight of a run: what the coordinator already knows that would stop it (pure decisions).

Before a run starts, every site of its plan is checked against what the site said at its last
hello: connected (or since when it is offline), the plan's dataset registered with the task and
no label outside the plan's, the plan's base model present, and the run's bundle approved.
The sites still check every task themselves; this only refuses early what they would refuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from coordinator.plan import RunPlan
from protocols.approval import ApprovalBundle, ApprovalRule
from protocols.task_types import LORA_TASK_TYPES

__all__ = ["SiteApprovals", "SiteView", "offline_text", "preflight_problems"]


@dataclass(frozen=True)
class SiteApprovals:
    """What a site reported at hello about the bundles it will run."""

    bundles: frozenset[str] = frozenset()
    by_policy: bool = False  # local rules may approve bundles not listed
    not_required: bool = False  # the site runs any bundle
    rules: tuple[ApprovalRule, ...] = ()  # its policy's rules (empty from older sites)

    def covers(self, sha256: str) -> bool | None:
        """True: approved; False: the site would refuse it; None: only the site can tell."""
        if self.not_required or sha256 in self.bundles:
            return True
        return None if self.by_policy else False

    def approves(self, bundle: ApprovalBundle) -> bool | None:
        """As `covers`, deciding policy approvals by the rules the site reported (None: it
        reported policy approvals but no rules, as sites did before they reported them)."""
        covered = self.covers(bundle.sha256)
        if covered is not None or not self.rules:
            return covered
        return any(rule.allows(bundle) for rule in self.rules)


@dataclass(frozen=True)
class SiteView:
    """One registered site as the coordinator knows it."""

    name: str
    connected: bool
    offline_since: datetime | None = None  # disconnect time, or the last hello as a bound
    offline_since_exact: bool = False  # False: offline_since is only when it was last seen
    base_models: list[Mapping[str, Any]] = field(default_factory=list)
    datasets: list[Mapping[str, Any]] = field(default_factory=list)
    approvals: SiteApprovals | None = None  # None: not reported since the coordinator started


def offline_text(view: SiteView) -> str:
    """`offline since 02:14 UTC`, or `offline (last seen ...)` when the drop time is unknown."""
    if view.offline_since is None:
        return "offline"
    when = f"{view.offline_since:%Y-%m-%d %H:%M} UTC"
    return f"offline since {when}" if view.offline_since_exact else f"offline (last seen {when})"


def preflight_problems(
    plan: RunPlan, sites: Mapping[str, SiteView], *, allow_offline: bool = False
) -> list[str]:
    """Every reason, one line each, why the plan's run would not go through; [] if none.

    Args:
        plan: The run plan to start.
        sites: Registered sites by name (a plan naming an unknown site is refused elsewhere).
        allow_offline: Offline sites are no problem (their hops wait for them).
    """
    problems: list[str] = []
    bundle = plan.approval_bundle().sha256
    names = list(dict.fromkeys(site for site, _ in plan.expanded_hops()))
    for name in names:
        view = sites.get(name)
        if view is None:
            continue  # never registered: RunEngine.start_run refuses the plan as invalid
        if not view.connected and not allow_offline:
            problems.append(f"{name}: {offline_text(view)} (--allow-offline queues the run)")
        problems += _data_problems(plan, view)
        if view.approvals is not None and view.approvals.covers(bundle) is False:
            problems.append(
                f"{name}: has not approved the run bundle {bundle} "
                f"(at the site, after review: baton-site approve {bundle})"
            )
    return problems


def _data_problems(plan: RunPlan, view: SiteView) -> list[str]:
    problems = []
    datasets = [d for d in view.datasets if d.get("name") == plan.dataset]
    if not datasets:
        registered = ", ".join(sorted(str(d.get("name")) for d in view.datasets)) or "none"
        problems.append(
            f"{view.name}: no dataset {plan.dataset!r} registered (registered: {registered})"
        )
    else:
        dataset = datasets[0]
        if dataset.get("task") != plan.task:
            problems.append(
                f"{view.name}: dataset {plan.dataset!r} is registered for {dataset.get('task')} "
                f"tasks, the plan is {plan.task}"
            )
        labels = set(dataset.get("labels") or ())
        extra = sorted(labels - set(plan.labels)) if plan.labels else []
        if extra:
            problems.append(
                f"{view.name}: dataset {plan.dataset!r} has label(s) {', '.join(extra)} that the "
                f"plan does not list ({', '.join(plan.labels)})"
            )
    if plan.task in LORA_TASK_TYPES:
        hashes = {str(m.get("sha256")) for m in view.base_models}
        if not hashes:
            problems.append(f"{view.name}: has no base model ({plan.task} needs one)")
        elif plan.base_model_sha256 and plan.base_model_sha256 not in hashes:
            problems.append(
                f"{view.name}: base model {plan.base_model_sha256[:12]} is not there (it has "
                f"{', '.join(sorted(h[:12] for h in hashes))})"
            )
    return problems
