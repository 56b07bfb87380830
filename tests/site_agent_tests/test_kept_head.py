"""A site keeps the newest signed ledger head that verifies, and exports it as an anchor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from protocols.ledger_head import SignedHead, sign_head
from site_agent.cli import app
from site_agent.heads import HEAD_FILE, KeptHead
from tests.conftest import Pki


def _head(pki: Pki, seq: int, digest: str = "ab" * 32, signer: str = "coordinator") -> SignedHead:
    return sign_head(
        seq,
        digest,
        private_key_pem=(pki.directory / f"{signer}.key").read_bytes(),
        certificate_pem=(pki.directory / f"{signer}.crt").read_bytes(),
    )


def test_site_keeps_the_newest_verified_head_and_never_goes_back(
    pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kept = KeptHead(tmp_path / HEAD_FILE, pki.directory / "ca.crt")
    assert kept.keep(_head(pki, 5).to_proto()) is not None
    newer = _head(pki, 9)
    assert kept.keep(newer.to_proto()) == newer
    with caplog.at_level(logging.ERROR):
        assert kept.keep(_head(pki, 7).to_proto()) == newer
        assert kept.keep(_head(pki, 12, signer="site-a").to_proto()) is None
    assert "older than the kept signed head #9" in caplog.text
    assert "signed by site 'site-a', not by a coordinator" in caplog.text
    assert kept.load() == newer


def test_ledger_head_command_exports_the_kept_anchor(pki: Pki, tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(app, ["ledger-head", "--data-dir", str(tmp_path)])
    assert missing.exit_code == 2 and "no signed ledger head kept" in missing.output
    head = _head(pki, 3)
    KeptHead(tmp_path / ".baton-site" / HEAD_FILE, pki.directory / "ca.crt").keep(head.to_proto())
    out = tmp_path / "anchor.json"
    result = runner.invoke(app, ["ledger-head", "--data-dir", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert SignedHead.from_json(json.loads(out.read_text())) == head
