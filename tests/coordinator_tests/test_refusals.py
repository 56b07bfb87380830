"""Every refusal path of the coordinator, each checked at the client and in the ledger."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import safetensors.numpy
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from coordinator.console.admin import AdminClient
from coordinator.plan import parse_plan
from coordinator.server import Coordinator
from protocols.checkpoint import CheckpointManifest, bundle_metadata, sha256_hex
from protocols.transport import TlsFiles
from protocols.v1 import baton_pb2 as pb
from tests.conftest import Pki
from tests.coordinator_tests.conftest import BASE, ScriptedSite


def _plan(*sites: str) -> dict[str, object]:
    return {"name": "t", "dataset": "notes", "labels": ["x", "y"], "sites": list(sites)}


def _refusals(coordinator: Coordinator) -> list[dict[str, object]]:
    return [e.payload for e in coordinator.engine.ledger.events() if e.kind == "access.refused"]


def _started(admin: AdminClient, site: ScriptedSite, *sites: str) -> pb.HopTask:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    admin.start_run(parse_plan(_plan(*(sites or ("site-a",)))))
    return site.next_task()


def _expired_certificate(pki: Pki, tmp_path: Path) -> TlsFiles:
    """site-a's certificate signed by the consortium CA, expired ten days ago."""
    return _certificate_of_our_ca(pki, tmp_path, "site", "site-a", valid_days=(-100, -10))


def test_expired_certificate_is_refused_in_the_tls_handshake(
    pki: Pki, coordinator: Coordinator, tmp_path: Path
) -> None:
    from protocols.transport import secure_channel
    from protocols.v1 import baton_pb2_grpc as pb_grpc

    tls = _expired_certificate(pki, tmp_path)
    with (
        secure_channel(f"localhost:{coordinator.port}", tls) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        pb_grpc.SiteServiceStub(channel).Hello(pb.HelloRequest(protocol_version=1), timeout=30)
    # Refused before any handler runs: there is no verified identity to record (docs/security.md).
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert coordinator.engine.ledger.sites() == []


def test_wrong_role_is_refused_and_recorded(pki: Pki, coordinator: Coordinator) -> None:
    with (
        AdminClient(f"localhost:{coordinator.port}", pki.tls("site-b")) as impostor,
        pytest.raises(grpc.RpcError) as refused,
    ):
        impostor.runs()
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    [row] = _refusals(coordinator)
    assert row["method"] == "ListRuns" and row["name"] == "site-b" and row["role"] == "site"
    assert row["serial"] and "admin certificate" in str(row["reason"])


def test_revoked_certificate_is_refused_on_the_next_call_and_its_stream_closed(
    pki: Pki, sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    admin.wait_for_sites({"site-a", "site-b"}, timeout=60)
    serial = format(
        x509.load_pem_x509_certificate((pki.directory / "site-b.crt").read_bytes()).serial_number,
        "x",
    )
    response = admin._stub.RevokeCertificate(
        pb.RevokeRequest(serial=serial, reason="laptop stolen"), timeout=30
    )
    assert response.closed_streams == 1
    deadline = time.monotonic() + 60
    while "site-b" in coordinator.engine.connected_sites() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "site-b" not in coordinator.engine.connected_sites()
    with pytest.raises(grpc.RpcError) as refused:
        sites["site-b"].hello()
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "laptop stolen" in refused.value.details()
    events = coordinator.engine.ledger.events()
    assert any(e.kind == "certificate.revoked" and e.payload["serial"] == serial for e in events)
    [row] = _refusals(coordinator)
    assert row["serial"] == serial and row["method"] == "Hello"
    sites["site-a"].hello()  # others are unaffected


def test_site_cannot_download_another_sites_checkpoint(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    task = _started(admin, sites["site-a"], "site-a", "site-b", "site-a")
    ref = sites["site-a"].upload(task, sites["site-a"].bundle(task))
    sites["site-a"].report(task, ref)
    sites["site-b"].next_task()
    with pytest.raises(grpc.RpcError):
        sites["site-a"].download(ref.sha256)
    [row] = _refusals(coordinator)
    assert row["method"] == "DownloadCheckpoint" and row["name"] == "site-a"
    assert row["code"] == "PERMISSION_DENIED"


@pytest.mark.parametrize(
    ("name", "make", "code", "reason"),
    [
        ("stale-lease", lambda s, t: (s.bundle(t), {"token": "0" * 32}), "FAILED_PRECONDITION",
         "lease token"),
        ("tampered-chunk", lambda s, t: (_flip(s.bundle(t)), {"sha": sha256_hex(s.bundle(t))}),
         "INVALID_ARGUMENT", "hash mismatch"),
        ("tampered-signature", lambda s, t: (s.bundle(t), {"signature": b"\x30\x06\x02\x01\x01"
                                                           b"\x02\x01\x01"}),
         "INVALID_ARGUMENT", "checkpoint-integrity"),
        ("nan-adapter", lambda s, t: (s.bundle(t, float("nan")), {}), "INVALID_ARGUMENT", "NaN"),
        ("oversized", lambda s, t: (_big(s, t), {}), "INVALID_ARGUMENT", "cap"),
    ],
    ids=["stale-lease", "tampered-chunk", "tampered-signature", "nan-adapter", "oversized"],
)  # fmt: skip
def test_bad_upload_is_refused_and_recorded(
    sites: dict[str, ScriptedSite],
    admin: AdminClient,
    coordinator: Coordinator,
    name: str,
    make,  # type: ignore[no-untyped-def]
    code: str,
    reason: str,
) -> None:
    site = sites["site-a"]
    task = _started(admin, site)
    coordinator.engine.max_checkpoint_bytes = 64 * 1024
    data, how = make(site, task)
    if "token" in how:
        stale = pb.HopTask()
        stale.CopyFrom(task)
        stale.lease_token = how["token"]
        task = stale
    with pytest.raises(grpc.RpcError) as refused:
        site.upload(task, data, sha=how.get("sha"), signature=how.get("signature"))
    assert refused.value.code().name == code and reason in refused.value.details()
    [row] = _refusals(coordinator)
    assert row["method"] == "UploadCheckpoint" and row["code"] == code
    assert row["name"] == "site-a" and reason in str(row["reason"])


def test_unexpected_tensor_name_is_refused_against_the_hops_input(
    sites: dict[str, ScriptedSite], admin: AdminClient, coordinator: Coordinator
) -> None:
    first = _started(admin, sites["site-a"], "site-a", "site-b")
    sites["site-a"].report(first, sites["site-a"].upload(first, sites["site-a"].bundle(first)))
    second = sites["site-b"].next_task()
    fields = dict(task_type=second.task_type, base_model_sha256=BASE, run_id=second.run_id,
                  hop_id=second.hop_id, producer_site="site-b",
                  parent_sha256=second.input_checkpoint.sha256)  # fmt: skip
    smuggled = safetensors.numpy.save(
        {"lora_A": np.ones((4, 2), np.float32), "patient_embeddings": np.ones(3, np.float32)},
        metadata=bundle_metadata(CheckpointManifest(**fields), {}),
    )
    with pytest.raises(grpc.RpcError) as refused:
        sites["site-b"].upload(second, smuggled)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "differ from the hop's input" in refused.value.details()
    [row] = _refusals(coordinator)
    assert row["name"] == "site-b"


def _flip(data: bytes) -> bytes:
    tampered = bytearray(data)
    tampered[-1] ^= 0x01
    return bytes(tampered)


def _big(site: ScriptedSite, task: pb.HopTask) -> bytes:
    fields = dict(task_type=task.task_type, base_model_sha256=BASE, run_id=task.run_id,
                  hop_id=task.hop_id, producer_site=site.name, parent_sha256="")  # fmt: skip
    return safetensors.numpy.save(
        {"lora_A": np.ones((256, 256), np.float32)},
        metadata=bundle_metadata(CheckpointManifest(**fields), {}),
    )


def test_site_anchor_unknown_to_the_ledger_is_refused_as_rewritten_history(
    sites: dict[str, ScriptedSite], coordinator: Coordinator
) -> None:
    head = coordinator.engine.ledger.head()
    known = pb.HelloRequest(protocol_version=1, last_ledger_hash=head)
    assert sites["site-a"].stub.Hello(known, timeout=30).site_name == "site-a"
    forged = pb.HelloRequest(protocol_version=1, last_ledger_hash="e" * 64)
    with pytest.raises(grpc.RpcError) as refused:
        sites["site-a"].stub.Hello(forged, timeout=30)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "rewritten" in refused.value.details()
    [row] = _refusals(coordinator)
    assert row["method"] == "Hello" and "e" * 64 in str(row["reason"])


def _certificate_of_our_ca(
    pki: Pki, tmp_path: Path, unit: str, name: str, valid_days: tuple[int, int] = (-1, 10)
) -> TlsFiles:
    """A certificate signed by the consortium CA with the given role OU and CN, valid from and
    until the given days from now (by default a current one)."""
    ca_key = serialization.load_pem_private_key((pki.directory / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki.directory / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([
        x509.NameAttribute(x509.NameOID.ORGANIZATION_NAME, "Baton"),
        x509.NameAttribute(x509.NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
        x509.NameAttribute(x509.NameOID.COMMON_NAME, name),
    ])  # fmt: skip
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=valid_days[0]))
        .not_valid_after(now + dt.timedelta(days=valid_days[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = tmp_path / "ours.crt", tmp_path / "ours.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return TlsFiles(pki.directory / "ca.crt", cert_path, key_path)


def _serial_and_subject(path: Path) -> tuple[str, str]:
    certificate = x509.load_pem_x509_certificate(path.read_bytes())
    return format(certificate.serial_number, "x"), certificate.subject.rfc4514_string()


@pytest.mark.parametrize(
    ("unit", "name"), [("site", "bad name/../x"), ("janitor", "site-z")], ids=["cn", "role"]
)
def test_certificate_of_our_ca_with_invalid_name_or_role_is_recorded_with_its_serial(
    pki: Pki, coordinator: Coordinator, tmp_path: Path, unit: str, name: str
) -> None:
    from protocols.transport import secure_channel
    from protocols.v1 import baton_pb2_grpc as pb_grpc

    tls = _certificate_of_our_ca(pki, tmp_path, unit, name)
    with (
        secure_channel(f"localhost:{coordinator.port}", tls) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        pb_grpc.SiteServiceStub(channel).Hello(pb.HelloRequest(protocol_version=1), timeout=30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    [row] = _refusals(coordinator)
    serial, subject = _serial_and_subject(tls.certificate)
    assert (row["serial"], row["subject"]) == (serial, subject)
    assert row["method"] == "Hello" and row["name"] is None


def test_wrong_role_refusal_names_the_certificate_subject(
    pki: Pki, coordinator: Coordinator
) -> None:
    with (
        AdminClient(f"localhost:{coordinator.port}", pki.tls("site-b")) as impostor,
        pytest.raises(grpc.RpcError),
    ):
        impostor.runs()
    [row] = _refusals(coordinator)
    assert (row["serial"], row["subject"]) == _serial_and_subject(pki.directory / "site-b.crt")


@pytest.mark.parametrize("streaming", [False, True], ids=["unary", "upload-stream"])
def test_malformed_message_refusal_names_the_certificate(
    pki: Pki, coordinator: Coordinator, streaming: bool
) -> None:
    from protocols.transport import secure_channel

    with (
        secure_channel(f"localhost:{coordinator.port}", pki.tls("site-a")) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        if streaming:
            upload = channel.stream_unary("/baton.v1.SiteService/UploadCheckpoint")
            upload(iter([b"\xff\xff\xff"]), timeout=30)
        else:
            channel.unary_unary("/baton.v1.SiteService/ReportHopResult")(
                b"\xff\xff\xff", timeout=30
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [row] = _refusals(coordinator)
    assert "malformed" in str(row["reason"])
    assert (row["serial"], row["subject"]) == _serial_and_subject(pki.directory / "site-a.crt")
    assert row["name"] == "site-a" and row["role"] == "site"
