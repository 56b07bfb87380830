"""Site policy rules that approve federated and hybrid runs of listed aggregation strategies."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.approval import ApprovalBundle
from site_agent.approvals import ApprovalPolicy, PolicyError

RULE = (
    '[[allow]]\ntask_types = ["tabular"]\ndatasets = ["heart"]\nbase_models = ["*"]\n'
    'modes = ["federated", "hybrid"]\n'
)


def _bundle(strategy: str) -> ApprovalBundle:
    return ApprovalBundle(
        task_type="tabular", dataset="heart", base_model_sha256="",
        federation={"mode": "federated", "strategy": strategy, "rounds": 2},
    )  # fmt: skip


def test_a_rule_listing_strategies_approves_only_those(tmp_path: Path) -> None:
    any_strategy = tmp_path / "any.toml"
    any_strategy.write_text(RULE)
    assert ApprovalPolicy.load(any_strategy).allows(_bundle("fedyogi"))
    listed = tmp_path / "listed.toml"
    listed.write_text(RULE + 'strategies = ["fedavg"]\n')
    policy = ApprovalPolicy.load(listed)
    assert policy.allows(_bundle("fedavg"))
    assert not policy.allows(_bundle("fedprox"))
    malformed = tmp_path / "malformed.toml"
    malformed.write_text(RULE + 'strategies = "fedavg"\n')
    with pytest.raises(PolicyError, match="'strategies' must be a list of run strategies"):
        ApprovalPolicy.load(malformed)
