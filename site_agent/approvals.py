"""Site approval, on by default: a run touches this site's data only if its bundle is approved.

A bundle is approved by its sha256 (`baton-site approve HASH`, or `approved_bundles` in the site's
settings), or by a local policy file whose rules it satisfies. Every bundle the site is asked to
run is remembered, so `baton-site approvals` shows pending ones for review.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import filelock

from protocols.approval import HYPERPARAMETERS, ApprovalBundle, ApprovalRule

__all__ = ["ApprovalPolicy", "ApprovalStore", "PolicyError"]

logger = logging.getLogger(__name__)


class PolicyError(ValueError):
    """The approval policy file is malformed."""


def _modes(value: object, what: str = "modes") -> frozenset[str]:
    if not isinstance(value, list) or not all(isinstance(mode, str) for mode in value):
        raise TypeError(f"{what!r} must be a list of run {what}, not {value!r}")
    if not value:  # it would approve nothing here, yet read back as the default elsewhere
        raise ValueError(f'{what!r} is empty: list at least one, or "*" for any')
    return frozenset(value)


@dataclass(frozen=True)
class ApprovalPolicy:
    """Rules (TOML `[[allow]]` tables) that approve bundles without a per-run review.

    Each rule lists `task_types`, `datasets` and `base_models` (sha256, or "*"), and may cap
    hyperparameters with `max_<name>` keys (e.g. `max_learning_rate = 0.01`, `max_steps = 500`).
    A rule approves sequential runs only unless it lists `modes` (e.g. `["sequential",
    "federated", "hybrid"]`, or "*"); it approves federated and hybrid runs of any aggregation
    strategy unless it lists `strategies` (e.g. `["fedavg", "fedprox"]`).
    """

    rules: tuple[ApprovalRule, ...] = ()

    @classmethod
    def load(cls, path: Path) -> ApprovalPolicy:
        try:
            document = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"approval policy {path} is unreadable: {exc}") from exc
        rules = []
        for index, raw in enumerate(document.get("allow", [])):
            try:
                max_values = {
                    k.removeprefix("max_"): float(v) for k, v in raw.items() if k.startswith("max_")
                }
                unknown = sorted(set(max_values) - set(HYPERPARAMETERS))
                if unknown:
                    raise ValueError(
                        f"{', '.join('max_' + name for name in unknown)} caps no hyperparameter "
                        f"(known: {', '.join('max_' + name for name in HYPERPARAMETERS)})"
                    )
                rules.append(
                    ApprovalRule(
                        task_types=frozenset(raw["task_types"]),
                        datasets=frozenset(raw["datasets"]),
                        base_models=frozenset(raw["base_models"]),
                        max_values=max_values,
                        modes=_modes(raw.get("modes", ["sequential"])),
                        strategies=_modes(raw.get("strategies", ["*"]), "strategies"),
                    )
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise PolicyError(f"{path}: allow rule {index + 1} is malformed: {exc}") from exc
        return cls(tuple(rules))

    def allows(self, bundle: ApprovalBundle) -> bool:
        return any(rule.allows(bundle) for rule in self.rules)


@dataclass
class ApprovalStore:
    """Approved bundle hashes and the bundles seen, in `<state_dir>/approvals.json`."""

    path: Path
    preapproved: frozenset[str] = frozenset()
    policy: ApprovalPolicy = field(default_factory=ApprovalPolicy)

    def _read(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {"approved": {}, "seen": {}}
        try:
            document: dict[str, Any] = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise PolicyError(f"approvals file {self.path} is unreadable: {exc}") from exc
        return document

    def _locked(self) -> filelock.BaseFileLock:
        """Serialises read-modify-write of the file between the agent and `baton-site approve`
        (without it, an approval made while the agent records a newly seen bundle is lost)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return filelock.FileLock(str(self.path) + ".lock", timeout=30)

    def _write(self, document: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".approvals.", suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(document, fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def approve(self, hashes: Iterable[str], *, by: str = "") -> None:
        with self._locked():
            document = self._read()
            now = datetime.now(UTC).isoformat()
            for digest in hashes:
                document["approved"][digest] = {"at": now, "by": by}
            self._write(document)

    def revoke(self, digest: str) -> bool:
        with self._locked():
            document = self._read()
            removed = document["approved"].pop(digest, None) is not None
            self._write(document)
        return removed

    def is_approved(self, bundle: ApprovalBundle) -> bool:
        """Approved by hash (file or settings) or by policy; records the bundle as seen."""
        digest = bundle.sha256
        # Every write replaces the file whole (`_write`): a read needs no lock, and sees an
        # approval or a revocation made a moment ago. The lock (10 ms on a loaded host, on
        # each hop's start) is taken only to record a bundle not seen before.
        document = self._read()
        if digest not in document["seen"]:
            with self._locked():
                document = self._read()
                if digest not in document["seen"]:
                    document["seen"][digest] = json.loads(bundle.canonical_json())
                    self._write(document)
        return (
            digest in self.preapproved
            or digest in document["approved"]
            or self.policy.allows(bundle)
        )

    def approved_hashes(self) -> list[str]:
        """Every bundle approved by hash (file or settings), sorted; policy rules aside."""
        try:
            approved = set(self._read()["approved"])
        except PolicyError:
            approved = set()
        return sorted(approved | set(self.preapproved))

    def listing(self) -> dict[str, Any]:
        """Seen bundles with their content, and which are approved."""
        document = self._read()
        approved = set(document["approved"]) | set(self.preapproved)
        return {
            digest: {"approved": digest in approved, "bundle": bundle}
            for digest, bundle in document["seen"].items()
        } | {
            digest: {"approved": True, "bundle": None}
            for digest in approved
            if digest not in document["seen"]
        }
