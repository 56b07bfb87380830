"""`baton-site doctor`: checks a site's setup end to end and says how to fix what fails.

Each check is independent and yields one `Check`: DNS, the network path (direct or through the
HTTP CONNECT proxy), the mTLS handshake with the coordinator, this site's certificate expiry,
clock skew against the coordinator, GPU/CUDA, free disk, registered data and the base model.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import grpc

from protocols.pki import PkiError, identity_from_pem
from protocols.transport import proxy_for, secure_channel
from protocols.v1 import baton_pb2 as pb
from protocols.v1 import baton_pb2_grpc as pb_grpc
from site_agent.registry import list_registered
from site_agent.settings import SiteSettings

__all__ = ["SKIPPABLE", "Check", "run_checks"]

# The checks of this host alone, which `--skip` may leave out (the gpu check imports torch: some
# seconds of CPU); those of the path to the coordinator always run.
SKIPPABLE = ("gpu", "disk", "data", "base-model")

MAX_CLOCK_SKEW_SECONDS = 30.0
CERTIFICATE_WARNING_DAYS = 30
_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{'OK  ' if self.ok else 'FAIL'} {self.name:<12} {self.detail}"
        return text if self.ok else f"{text} -> fix: {self.fix}"


def _split(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def _dns(host: str) -> Check:
    try:
        addresses = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError) as exc:
        return Check(
            "dns",
            False,
            f"{host} does not resolve ({exc})",
            f"check the coordinator's name in --coordinator and this host's DNS "
            f"(/etc/resolv.conf); ask IT to resolve {host}, or use its IP "
            "with --server-name",
        )
    return Check("dns", True, f"{host} -> {', '.join(addresses[:3])}")


def _network(target: str, proxy: str | None) -> Check:
    host, port = _split(target)
    if proxy is None:
        try:
            with socket.create_connection((host, port), timeout=_TIMEOUT_SECONDS):
                pass
        except OSError as exc:
            return Check(
                "network",
                False,
                f"no TCP connection to {target} ({exc})",
                f"check that the coordinator runs and that the firewall lets this host "
                f"out to {target}; behind a web proxy set https_proxy",
            )
        return Check("network", True, f"direct TCP connection to {target}")
    parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    proxy_address = (parts.hostname or "", parts.port or 3128)
    try:
        with socket.create_connection(proxy_address, timeout=_TIMEOUT_SECONDS) as sock:
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            sock.settimeout(_TIMEOUT_SECONDS)
            status = sock.recv(4096).split(b"\r\n", 1)[0].decode("latin-1", "replace")
    except OSError as exc:
        return Check(
            "proxy",
            False,
            f"proxy {parts.hostname}:{proxy_address[1]} unreachable ({exc})",
            "check https_proxy (or grpc_proxy) and that the proxy runs; "
            "to go direct, list the coordinator in no_proxy",
        )
    if " 200 " not in f"{status} ":
        return Check(
            "proxy",
            False,
            f"proxy refused CONNECT {target}: {status or 'no answer'}",
            f"ask IT to allow CONNECT to {target} (HTTP/2 over TLS, long-lived "
            "streams) on the proxy",
        )
    return Check("proxy", True, f"CONNECT {target} through {parts.hostname}:{proxy_address[1]}")


def _last_error(details: str) -> str:
    """gRPC's connection error without its preamble: the part that names the cause."""
    cause = details.splitlines()[0].rsplit("last error: ", 1)[-1]
    return cause if len(cause) <= 160 else cause[:157] + "..."


def _offset(skew: float) -> str:
    """`skew` = coordinator clock minus this host's, in words."""
    return f"{abs(skew):.2f} s {'behind' if skew > 0 else 'ahead of'}"


def _tls_fix(details: str, settings: SiteSettings) -> str:
    lowered = details.lower()
    if "certificate_verify_failed" in lowered or "certificate verify failed" in lowered:
        return (
            f"the coordinator's certificate is not signed by {settings.ca_certificate}: use "
            "the consortium's ca.crt from your provisioning kit"
        )
    if "hostname" in lowered or ("name" in lowered and "mismatch" in lowered):
        return (
            "the coordinator's certificate does not name the host you dial: use its DNS "
            "name in --coordinator, or --server-name NAME"
        )
    if "handshake" in lowered or "ssl" in lowered:
        return (
            "the TLS handshake failed: check that --coordinator is Baton's gRPC port and "
            "that your certificate and key match and come from the consortium CA"
        )
    return "check that the coordinator runs and is reachable (see the network check above)"


def _coordinator(settings: SiteSettings, checks: list[Check]) -> pb.ConnectionCheck | None:
    """Calls CheckConnection: the mTLS handshake, and the coordinator's clock."""
    try:
        channel = secure_channel(
            settings.coordinator, settings.tls, server_name=settings.server_name
        )
    except PkiError as exc:
        checks.append(Check("tls", False, str(exc), "give --ca, --cert and --key files that exist"))
        return None
    with channel:
        sent = time.time_ns()
        try:
            answer: pb.ConnectionCheck = pb_grpc.SiteServiceStub(channel).CheckConnection(
                pb.ConnectionCheckRequest(), timeout=_TIMEOUT_SECONDS
            )
        except grpc.RpcError as exc:
            details = exc.details() or ""
            code = exc.code()
            if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                fix = (
                    "this certificate is refused (revoked, or not a site certificate): ask the "
                    "CA holder for a new site certificate"
                )
            elif code == grpc.StatusCode.UNIMPLEMENTED:
                fix = "the coordinator is older than this agent: upgrade the coordinator"
            else:
                fix = _tls_fix(details, settings)
            checks.append(
                Check(
                    "tls",
                    False,
                    f"{code.name}: {_last_error(details)}" if details else code.name,
                    fix,
                )
            )
            return None
        received = time.time_ns()
    checks.append(
        Check(
            "tls",
            True,
            f"mTLS with {settings.coordinator} as site "
            f"{answer.site_name!r} (coordinator {answer.coordinator_version})",
        )
    )
    skew = (answer.coordinator_time_unix_ns - (sent + received) / 2) / 1e9
    round_trip = (received - sent) / 1e9
    if abs(skew) > MAX_CLOCK_SKEW_SECONDS + round_trip:
        checks.append(
            Check(
                "clock",
                False,
                f"this host's clock is {_offset(skew)} the coordinator's",
                "enable time synchronisation (timedatectl set-ntp "
                "true, or chrony/ntpd against the hospital's NTP server)",
            )
        )
    else:
        checks.append(Check("clock", True, f"{_offset(skew)} the coordinator's clock"))
    return answer


def _certificate(settings: SiteSettings) -> Check:
    try:
        identity = identity_from_pem(settings.certificate.read_bytes())
    except (OSError, PkiError) as exc:
        return Check("certificate", False, str(exc), "give the site certificate with --cert")
    days = (identity.not_valid_after - datetime.now(UTC)).total_seconds() / 86400
    if days < 0:
        return Check(
            "certificate",
            False,
            f"{identity.name}'s certificate expired {identity.not_valid_after:%Y-%m-%d}",
            "renew offline: `baton-site cert csr`, then the CA holder runs `baton pki sign`",
        )
    if days < CERTIFICATE_WARNING_DAYS:
        return Check(
            "certificate",
            False,
            f"{identity.name}'s certificate expires in {days:.0f} days",
            "run `baton-site cert renew` (online) or `baton-site cert csr` (offline)",
        )
    return Check(
        "certificate",
        True,
        f"{identity.name}, expires {identity.not_valid_after:%Y-%m-%d} ({days:.0f} days)",
    )


def _gpu(settings: SiteSettings) -> Check:
    import torch

    wants_cuda = (settings.device or "").startswith("cuda")
    if not torch.cuda.is_available():
        if wants_cuda:
            return Check(
                "gpu",
                False,
                f"--device {settings.device} but CUDA is not available (torch {torch.__version__})",
                "install the CUDA build of torch and the NVIDIA driver, or run with --device cpu",
            )
        return Check(
            "gpu", True, f"no CUDA device: training runs on CPU (torch {torch.__version__})"
        )
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    bf16 = "bf16 supported" if torch.cuda.is_bf16_supported() else "no bf16"
    return Check("gpu", True, f"CUDA {torch.version.cuda}: {', '.join(names)}; {bf16}")


def _disk(settings: SiteSettings, min_free_bytes: int) -> Check:
    if not settings.data_dir.is_dir():
        return Check(
            "disk",
            False,
            f"data folder {settings.data_dir} does not exist",
            "create it, or give the right --data-dir",
        )
    free = shutil.disk_usage(settings.data_dir).free
    detail = f"{free / 1024**3:.1f} GiB free in {settings.data_dir}"
    if free < min_free_bytes:
        return Check(
            "disk",
            False,
            detail,
            f"free at least {min_free_bytes / 1024**3:.0f} GiB "
            "there (checkpoints, base models and logs)",
        )
    return Check("disk", True, detail)


def _data(settings: SiteSettings, expected: list[str]) -> Check:
    entries = list_registered(settings.data_dir) if settings.data_dir.is_dir() else []
    broken = [str(e["name"]) for e in entries if e.get("status") != "ok"]
    names = {str(e["name"]) for e in entries if e.get("status") == "ok"}
    missing = sorted(set(expected) - names)
    if broken:
        return Check(
            "data",
            False,
            f"registered data changed or unreadable: {', '.join(broken)}",
            "re-register with `baton-site data add NAME FILE --task T --replace`",
        )
    if missing:
        return Check(
            "data",
            False,
            f"runs expect dataset(s) not registered here: {', '.join(missing)}",
            "register them with `baton-site data add NAME FILE --task T`",
        )
    if not names:
        return Check(
            "data",
            False,
            f"no dataset registered in {settings.data_dir}",
            "register one with `baton-site data add NAME FILE --task T`",
        )
    return Check("data", True, f"{len(names)} dataset(s): {', '.join(sorted(names))}")


def _base_model(settings: SiteSettings, pinned: list[str]) -> Check:
    if settings.base_model_dir is None:
        return Check("base-model", True, "none configured (tabular tasks only)")
    if not settings.base_model_dir.is_dir():
        return Check(
            "base-model",
            False,
            f"{settings.base_model_dir} is not a folder",
            "give the local base model folder with --base-model",
        )
    from site_agent.tasks import hash_base_model

    try:
        digest = hash_base_model(settings.base_model_dir)
    except (OSError, ValueError) as exc:
        return Check("base-model", False, str(exc), "copy the complete base model folder again")
    if pinned and digest not in pinned:
        return Check(
            "base-model",
            False,
            f"sha256 {digest[:16]}…, runs pin {', '.join(p[:16] + '…' for p in pinned)}",
            "install the base model the "
            "runs were planned with (compare `baton-site model-hash DIR`)",
        )
    return Check("base-model", True, f"sha256 {digest}")


def run_checks(
    settings: SiteSettings,
    *,
    min_free_bytes: int = 2 * 1024**3,
    skip: Collection[str] = (),
) -> Iterator[Check]:
    """Runs every check in order: an iterator that yields each result as soon as it is known.

    Args:
        settings: The site's settings, as `baton-site serve` takes them.
        min_free_bytes: Free space the data folder needs.
        skip: Checks of `SKIPPABLE` not to run (nor yield).

    Raises:
        ValueError: `skip` names a check that is not in `SKIPPABLE`.
    """
    unknown = set(skip) - set(SKIPPABLE)
    if unknown:
        raise ValueError(f"cannot skip {', '.join(sorted(unknown))}: only {', '.join(SKIPPABLE)}")
    return _checks(settings, min_free_bytes, frozenset(skip))


def _checks(settings: SiteSettings, min_free_bytes: int, skip: frozenset[str]) -> Iterator[Check]:
    proxy = proxy_for(settings.coordinator)
    host, _ = _split(settings.coordinator)
    if proxy is None:
        yield _dns(host)
    else:
        yield Check("dns", True, f"{host} is resolved by the proxy")
    yield _network(settings.coordinator, proxy)
    checks: list[Check] = []
    answer = _coordinator(settings, checks)
    yield from checks
    yield _certificate(settings)
    local: dict[str, Callable[[], Check]] = {
        "gpu": lambda: _gpu(settings),
        "disk": lambda: _disk(settings, min_free_bytes),
        "data": lambda: _data(settings, list(answer.datasets) if answer else []),
        "base-model": lambda: _base_model(
            settings, list(answer.pinned_base_models) if answer else []
        ),
    }
    for name, check in local.items():
        if name not in skip:
            yield check()
