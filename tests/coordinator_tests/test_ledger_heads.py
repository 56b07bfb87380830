"""Signed ledger heads: signing, verification, and a cut or rewritten tail named by verify."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from coordinator.console.admin import AdminClient
from coordinator.console.cli import app
from coordinator.ledger import HEADS_FILE, HeadSigner, Ledger, check_heads, read_heads
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.ledger_head import HeadError, SignedHead, sign_head
from protocols.v1 import baton_pb2 as pb
from tests.conftest import Pki
from tests.coordinator_tests.conftest import ScriptedSite

runner = CliRunner()


def _signer(pki: Pki, path: Path, name: str = "coordinator", every: int = 100) -> HeadSigner:
    return HeadSigner(
        path,
        private_key_pem=(pki.directory / f"{name}.key").read_bytes(),
        certificate_pem=(pki.directory / f"{name}.crt").read_bytes(),
        every=every,
    )


def test_signed_head_verifies_against_the_ca_and_refuses_any_change(pki: Pki) -> None:
    ca = (pki.directory / "ca.crt").read_bytes()
    head = sign_head(
        7,
        "ab" * 32,
        private_key_pem=(pki.directory / "coordinator.key").read_bytes(),
        certificate_pem=(pki.directory / "coordinator.crt").read_bytes(),
    )
    head.verify(ca)
    assert SignedHead.from_json(json.loads(json.dumps(head.to_json()))) == head
    assert SignedHead.from_proto(head.to_proto()) == head
    for changed in ({"seq": 8}, {"hash": "cd" * 32}, {"signed_at": _later(head.signed_at)}):
        forged = SignedHead.from_json({**head.to_json(), **changed})
        with pytest.raises(HeadError, match="ledger head signature of 'coordinator' does not"):
            forged.verify(ca)


def _later(signed_at: str) -> str:
    at = datetime.fromisoformat(signed_at.replace("Z", "+00:00")) + timedelta(seconds=1)
    return at.isoformat().replace("+00:00", "Z")


def test_head_signed_by_a_site_or_another_ca_is_refused(pki: Pki) -> None:
    ca = (pki.directory / "ca.crt").read_bytes()
    by_site = sign_head(
        1,
        "ab" * 32,
        private_key_pem=(pki.directory / "site-a.key").read_bytes(),
        certificate_pem=(pki.directory / "site-a.crt").read_bytes(),
    )
    with pytest.raises(HeadError, match="signed by site 'site-a', not by a coordinator"):
        by_site.verify(ca)
    foreign = sign_head(
        1,
        "ab" * 32,
        private_key_pem=(pki.foreign / "site-a.key").read_bytes(),
        certificate_pem=(pki.foreign / "site-a.crt").read_bytes(),
    )
    with pytest.raises(HeadError, match="not from the consortium CA"):
        foreign.verify(ca)


def test_heads_are_signed_at_run_transitions_and_every_n_events(
    pki: Pki, ledger: Ledger, tmp_path: Path
) -> None:
    signer = _signer(pki, tmp_path / HEADS_FILE, every=3)
    received: list[SignedHead] = []
    signer.listeners.append(received.append)
    ledger.head_observers.append(signer.observe)
    for index in range(7):
        ledger.record_event("test.event", payload={"index": index})
    ledger.record_event("run.paused")
    signer.wait()
    kept = list(read_heads(tmp_path / HEADS_FILE))
    assert [h.seq for h in kept] == [3, 6, 8] and kept == received
    events = {e.seq: e.hash for e in ledger.events()}
    assert all(events[h.seq] == h.hash for h in kept)
    assert (
        HeadSigner(tmp_path / HEADS_FILE, private_key_pem=b"", certificate_pem=b"").newest
        == (kept[-1])
    )


def test_a_head_is_signed_off_the_committing_thread_and_the_same_heads_are_kept(
    pki: Pki, ledger: Ledger, tmp_path: Path
) -> None:
    signer = _signer(pki, tmp_path / HEADS_FILE, every=2)
    held = threading.Event()
    signed_on: list[threading.Thread] = []

    def slow_listener(head: SignedHead) -> None:
        signed_on.append(threading.current_thread())
        held.wait(10)  # a slow signature or fsync: the commits below must not wait for it

    signer.listeners.append(slow_listener)
    ledger.head_observers.append(signer.observe)
    for index in range(5):
        ledger.record_event("test.event", payload={"index": index})
    ledger.record_event("run.paused")
    held.set()
    signer.wait()
    assert signed_on and threading.current_thread() not in signed_on
    kept = list(read_heads(tmp_path / HEADS_FILE))
    assert [h.seq for h in kept] == [2, 4, 6]  # as signed on the committing thread: in order
    events = {e.seq: e.hash for e in ledger.events()}
    assert all(events[h.seq] == h.hash for h in kept)
    for head in kept:
        head.verify((pki.directory / "ca.crt").read_bytes())


def test_deleting_the_last_events_after_a_signed_head_is_named(
    pki: Pki, ledger: Ledger, tmp_path: Path
) -> None:
    signer = _signer(pki, tmp_path / HEADS_FILE)
    for index in range(5):
        ledger.record_event("test.event", payload={"index": index})
    head = signer.sign_current(ledger)
    assert head is not None and head.seq == 5
    ca = (pki.directory / "ca.crt").read_bytes()
    heads = [("heads", h) for h in read_heads(tmp_path / HEADS_FILE)]
    assert check_heads(ledger, heads, ca_pem=ca, last_seq=5) == ([], head)
    with ledger.engine.begin() as connection:
        connection.execute(text("DELETE FROM events WHERE seq > 3"))
    result = ledger.verify()
    assert result.chain_break is None and result.last_seq == 3  # the chain alone still verifies
    problems, _ = check_heads(ledger, heads, ca_pem=ca, last_seq=result.last_seq)
    assert [p.message for p in problems] == [
        f"ledger truncated: signed head #5 (hash {head.hash[:12]}..., signed {head.signed_at}) "
        "but the ledger ends at #3"
    ]


def test_rewritten_history_under_a_signed_head_is_named(
    pki: Pki, ledger: Ledger, tmp_path: Path
) -> None:
    signer = _signer(pki, tmp_path / HEADS_FILE)
    for index in range(4):
        ledger.record_event("test.event", payload={"index": index})
    head = signer.sign_current(ledger)
    assert head is not None
    with ledger.engine.begin() as connection:
        connection.execute(text("DELETE FROM events WHERE seq > 2"))
    for index in range(4):  # a different history, re-chained from event 2
        ledger.record_event("test.event", payload={"index": 100 + index})
    result = ledger.verify()
    assert result.chain_break is None
    ca = (pki.directory / "ca.crt").read_bytes()
    problems, _ = check_heads(ledger, [("heads", head)], ca_pem=ca, last_seq=result.last_seq)
    [problem] = problems
    if ledger.engine.dialect.name == "sqlite":  # SQLite reuses seq 3 and 4
        assert problem.message.startswith(
            f"history rewritten: signed head #4 (hash {head.hash[:12]}..."
        )
        assert "but the ledger's event #4 has hash" in problem.message
    else:  # PostgreSQL's sequence moves on: event 4 is gone
        assert problem.message.startswith("ledger event #4 is missing: signed head #4")


def _state_with_heads(pki: Pki, tmp_path: Path) -> tuple[Path, Ledger, SignedHead]:
    state = tmp_path / "state"
    state.mkdir()
    ledger = Ledger(f"sqlite:///{state / 'ledger.sqlite3'}")
    ledger.migrate()
    signer = _signer(pki, state / HEADS_FILE, every=2)
    ledger.head_observers.append(signer.observe)
    for index in range(4):
        ledger.record_event("test.event", payload={"index": index})
    signer.wait()
    assert signer.newest is not None
    return state, ledger, signer.newest


def test_cli_verify_names_a_truncated_tail_from_the_heads_file_or_an_anchor(
    pki: Pki, tmp_path: Path
) -> None:
    state, ledger, head = _state_with_heads(pki, tmp_path)
    ca = ["--ca", str(pki.directory / "ca.crt")]
    ok = runner.invoke(app, ["ledger", "verify", "--state-dir", str(state), *ca])
    assert ok.exit_code == 0, ok.output
    assert f"reaches the newest signed head #4 (hash {head.hash[:12]}..." in ok.output
    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps(head.to_json(), indent=2))
    with ledger.engine.begin() as connection:
        connection.execute(text("DELETE FROM events WHERE seq > 2"))
    (state / HEADS_FILE).unlink()  # who cuts the ledger can also delete the coordinator's file
    unanchored = runner.invoke(app, ["ledger", "verify", "--state-dir", str(state), *ca])
    assert unanchored.exit_code == 0 and "no signed head checked" in unanchored.output
    cut = runner.invoke(
        app, ["ledger", "verify", "--state-dir", str(state), "--anchor", str(anchor), *ca]
    )
    assert cut.exit_code == 1
    assert (
        f"error: ledger truncated: signed head #4 (hash {head.hash[:12]}..., signed "
        f"{head.signed_at}) but the ledger ends at #2"
    ) in cut.output
    ledger.close()


def test_cli_verify_without_a_ca_still_finds_truncation_but_refuses_unchecked_anchors(
    pki: Pki, tmp_path: Path
) -> None:
    state, ledger, head = _state_with_heads(pki, tmp_path)
    no_ca = ["--ca", str(tmp_path / "absent-ca.crt")]
    ok = runner.invoke(app, ["ledger", "verify", "--state-dir", str(state), *no_ca])
    assert ok.exit_code == 0, ok.output
    assert "signatures of" in ok.output and "not checked" in ok.output
    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps(head.to_json()))
    unchecked = runner.invoke(
        app, ["ledger", "verify", "--state-dir", str(state), "--anchor", str(anchor), *no_ca]
    )
    assert unchecked.exit_code == 2 and "give --ca to check the anchor" in unchecked.output
    with ledger.engine.begin() as connection:
        connection.execute(text("DELETE FROM events WHERE seq > 2"))
    cut = runner.invoke(app, ["ledger", "verify", "--state-dir", str(state), *no_ca])
    assert cut.exit_code == 1
    assert "error: ledger truncated: signed head #4" in cut.output
    ledger.close()


def test_cli_verify_refuses_an_anchor_with_a_tampered_signature(pki: Pki, tmp_path: Path) -> None:
    state, ledger, head = _state_with_heads(pki, tmp_path)
    ledger.close()
    forged = head.to_json()
    forged["signature"] = forged["signature"][:-4] + (
        "0000" if not forged["signature"].endswith("0000") else "1111"
    )
    anchor = tmp_path / "anchor.json"
    anchor.write_text(json.dumps(forged))
    result = runner.invoke(
        app,
        [
            "ledger",
            "verify",
            "--state-dir",
            str(state),
            "--anchor",
            str(anchor),
            "--ca",
            str(pki.directory / "ca.crt"),
        ],
    )
    assert result.exit_code == 1
    assert f"error: {anchor}: refused: signed head #4" in result.output
    assert "ledger head signature of 'coordinator' does not verify" in result.output
    unreadable = tmp_path / "junk.json"
    unreadable.write_text('{"format": "other"}')
    junk = runner.invoke(
        app, ["ledger", "verify", "--state-dir", str(state), "--anchor", str(unreadable)]
    )
    assert junk.exit_code == 2 and "not a signed ledger head" in junk.output


def test_connected_sites_receive_each_signed_head_and_the_newest_on_connect(
    pki: Pki, coordinator: Coordinator, admin: AdminClient
) -> None:
    site_a, site_b = (ScriptedSite(pki, name, coordinator.port) for name in ("site-a", "site-b"))
    try:
        site_a.connect()
        site_b.hello()
        admin.wait_for_sites({"site-a"}, timeout=60)  # its stream open: online, not just known
        run_id = admin.start_run(
            parse_plan({"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": ["site-a"]})
        )
        task = site_a.next_task()
        site_a.report(task, site_a.upload(task, site_a.bundle(task)))
        assert admin.run(run_id).status == "completed"
        events = {e.seq: e for e in coordinator.engine.ledger.events()}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # signed off the commit's thread, soon after it
            kept = list(read_heads(coordinator.engine.runs_dir.parent / HEADS_FILE))
            if events[kept[-1].seq].kind == "run.completed":
                break
            time.sleep(0.02)
        assert [events[h.seq].kind for h in kept[-2:]] == ["run.created", "run.completed"]
        while len(site_a.heads) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        received = [SignedHead.from_proto(h) for h in site_a.heads]
        assert received[-2:] == kept[-2:]
        received[-1].verify((pki.directory / "ca.crt").read_bytes())
        site_b.connect()  # a site connecting later is handed the newest head at once
        while not site_b.heads and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [SignedHead.from_proto(h) for h in site_b.heads] == [kept[-1]]
    finally:
        site_a.close()
        site_b.close()


def test_hello_with_a_kept_head_the_ledger_no_longer_reaches_is_refused(
    pki: Pki, coordinator: Coordinator
) -> None:
    ledger = coordinator.engine.ledger
    site = ScriptedSite(pki, "site-a", coordinator.port)
    try:
        site.hello()
        last = ledger.last_event()
        assert last is not None
        head = sign_head(
            last.seq,
            ledger.head(),
            private_key_pem=(pki.directory / "coordinator.key").read_bytes(),
            certificate_pem=(pki.directory / "coordinator.crt").read_bytes(),
        )
        request = pb.HelloRequest(agent_version="test", protocol_version=1)
        request.kept_head.CopyFrom(head.to_proto())
        site.stub.Hello(request, timeout=30)  # the ledger reaches it: welcome
        with ledger.engine.begin() as connection:
            connection.execute(text("DELETE FROM events WHERE seq >= :seq"), {"seq": head.seq})
        with pytest.raises(grpc.RpcError) as refused:
            site.stub.Hello(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details() == (
            f"this site's signed ledger head #{head.seq} does not match the ledger (the ledger "
            f"ends at #{head.seq - 1}, short of event #{head.seq}): the coordinator's ledger was "
            "truncated or rewritten"
        )
    finally:
        site.close()
