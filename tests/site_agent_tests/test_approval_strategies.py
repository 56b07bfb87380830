"""Site policy rules that approve federated and hybrid runs of listed aggregation strategies."""

from __future__ import annotations

import subprocess
import sys
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


@pytest.mark.parametrize("key", ["modes", "strategies"])
def test_a_rule_with_an_empty_modes_or_strategies_list_is_refused_when_the_policy_loads(
    tmp_path: Path, key: str
) -> None:
    # Empty, it would approve nothing at the site while the coordinator (which reads an empty
    # list as the default) predicts approvals.
    rule = RULE.replace('modes = ["federated", "hybrid"]\n', "")
    policy = tmp_path / "policy.toml"
    policy.write_text(RULE + "[[allow]]\n" + rule.removeprefix("[[allow]]\n") + f"{key} = []\n")
    with pytest.raises(PolicyError) as refused:
        ApprovalPolicy.load(policy)
    assert str(refused.value) == (
        f"{policy}: allow rule 2 is malformed: '{key}' is empty: list at least one, "
        'or "*" for any'
    )


def test_serve_refuses_a_malformed_policy_in_one_line(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(RULE + "strategies = []\n")
    for name in ("ca.crt", "site.crt", "site.key"):
        (tmp_path / name).touch()
    done = subprocess.run(
        [
            sys.executable, "-c", "from site_agent.cli import main; main()",
            "serve", "--coordinator", "localhost:1",
            "--ca", str(tmp_path / "ca.crt"), "--cert", str(tmp_path / "site.crt"),
            "--key", str(tmp_path / "site.key"), "--data-dir", str(tmp_path),
            "--approval-policy", str(policy),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (
        f"error: {policy}: allow rule 1 is malformed: 'strategies' is empty: list at least one, "
        'or "*" for any\n'
    )
