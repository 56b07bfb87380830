"""Site approval: by hash, by settings, by policy rules; every bundle asked for is remembered."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocols.approval import ApprovalBundle, BundleViolation
from site_agent.approvals import ApprovalPolicy, ApprovalStore, PolicyError

BUNDLE = ApprovalBundle(
    task_type="seq-classification", dataset="triage-notes", base_model_sha256="ab" * 32,
    labels=("a", "b"), bounds={"learning_rate": (1e-4, 1e-3), "steps": (10.0, 50.0)},
)  # fmt: skip


def test_unapproved_bundle_is_remembered_for_review_then_approved_by_hash(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path / "approvals.json")
    assert not store.is_approved(BUNDLE)
    assert store.listing()[BUNDLE.sha256]["approved"] is False
    store.approve([BUNDLE.sha256], by="irb-officer")
    assert store.is_approved(BUNDLE)
    assert store.listing()[BUNDLE.sha256]["bundle"]["dataset"] == "triage-notes"


def test_settings_preapproval_and_revoking_an_approval(tmp_path: Path) -> None:
    store = ApprovalStore(tmp_path / "approvals.json", preapproved=frozenset({BUNDLE.sha256}))
    assert store.is_approved(BUNDLE)
    other = ApprovalStore(tmp_path / "other.json")
    other.approve([BUNDLE.sha256])
    assert other.revoke(BUNDLE.sha256) and not other.is_approved(BUNDLE)


def test_a_seen_bundle_is_checked_without_the_file_lock_and_a_revocation_still_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = ApprovalStore(tmp_path / "approvals.json")
    cli = ApprovalStore(tmp_path / "approvals.json")  # `baton-site approve` / `revoke`
    assert not agent.is_approved(BUNDLE)  # first sight: recorded under the lock
    cli.approve([BUNDLE.sha256])

    def no_lock() -> None:
        raise AssertionError("the lock is for recording a bundle not seen before")

    monkeypatch.setattr(agent, "_locked", no_lock)
    assert agent.is_approved(BUNDLE)
    assert cli.revoke(BUNDLE.sha256)
    assert not agent.is_approved(BUNDLE)  # the revocation is read at once
    assert agent.listing()[BUNDLE.sha256]["bundle"]["dataset"] == "triage-notes"


def test_bundle_hash_covers_every_field() -> None:
    widened = ApprovalBundle(**{**BUNDLE.__dict__, "bounds": {"learning_rate": (1e-4, 1e-2)}})
    assert widened.sha256 != BUNDLE.sha256
    assert ApprovalBundle.from_json(BUNDLE.canonical_json()).sha256 == BUNDLE.sha256


def test_hyperparameters_outside_the_bounds_violate_the_bundle() -> None:
    BUNDLE.check_hyperparameters({"learning_rate": 5e-4, "steps": 20})
    with pytest.raises(BundleViolation, match="learning_rate"):
        BUNDLE.check_hyperparameters({"learning_rate": 0.5, "steps": 20})


def test_policy_rules_approve_within_their_limits_only(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        '[[allow]]\ntask_types = ["seq-classification"]\ndatasets = ["triage-notes"]\n'
        'base_models = ["*"]\nmax_learning_rate = 0.001\nmax_steps = 100\n'
    )
    policy = ApprovalPolicy.load(policy_file)
    assert policy.allows(BUNDLE)
    too_fast = ApprovalBundle(**{**BUNDLE.__dict__, "bounds": {"learning_rate": (1e-4, 0.1),
                                                               "steps": (10.0, 50.0)}})  # fmt: skip
    assert not policy.allows(too_fast)
    unbounded = ApprovalBundle(**{**BUNDLE.__dict__, "bounds": {"learning_rate": (1e-4, 1e-3)}})
    assert not policy.allows(unbounded)  # steps is capped by the rule but not bounded by the run
    other_data = ApprovalBundle(**{**BUNDLE.__dict__, "dataset": "oncology"})
    assert not policy.allows(other_data)
    assert ApprovalStore(tmp_path / "a.json", policy=policy).is_approved(BUNDLE)


def test_malformed_policy_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "policy.toml"
    bad.write_text('[[allow]]\ntask_types = ["tabular"]\n')
    with pytest.raises(PolicyError, match="allow rule 1"):
        ApprovalPolicy.load(bad)


def test_a_policy_cap_on_an_unknown_hyperparameter_is_a_clear_error(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        '[[allow]]\ntask_types = ["*"]\ndatasets = ["*"]\nbase_models = ["*"]\n'
        "max_learnig_rate = 0.01\nmax_proximal_mu = 1.0\n"
    )
    with pytest.raises(PolicyError, match="allow rule 1") as refused:
        ApprovalPolicy.load(policy)
    assert "max_learnig_rate caps no hyperparameter (known: max_learning_rate, " in str(
        refused.value
    )
    assert "max_proximal_mu," not in str(refused.value).split("(known")[0]


def test_policy_rules_approve_federated_runs_only_when_they_list_the_mode(tmp_path: Path) -> None:
    federated = ApprovalBundle(**{**BUNDLE.__dict__, "federation": {"mode": "federated",
                                                                    "strategy": "fedavg",
                                                                    "rounds": 3}})  # fmt: skip
    rule = (
        '[[allow]]\ntask_types = ["seq-classification"]\ndatasets = ["triage-notes"]\n'
        'base_models = ["*"]\n'
    )
    sequential_only = tmp_path / "sequential.toml"
    sequential_only.write_text(rule)
    assert ApprovalPolicy.load(sequential_only).allows(BUNDLE)
    assert not ApprovalPolicy.load(sequential_only).allows(federated)
    listed = tmp_path / "federated.toml"
    listed.write_text(rule + 'modes = ["sequential", "federated"]\n')
    assert ApprovalPolicy.load(listed).allows(federated)
    as_text = tmp_path / "text.toml"
    as_text.write_text(rule + 'modes = "federated"\n')
    with pytest.raises(PolicyError, match="'modes' must be a list"):
        ApprovalPolicy.load(as_text)
