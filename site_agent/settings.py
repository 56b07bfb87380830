"""Site agent configuration: file, environment (BATON_SITE_*), then CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from protocols.settings import FileBackedSettings, load_settings
from protocols.transport import TlsFiles

__all__ = ["Preload", "SiteSettings", "load_site_settings"]

# When a site imports torch and loads its base model (hello never waits for either):
# "eager": in the background as soon as it has said hello; "when-scheduled": once a run this
# site is in (and approved) starts, at a low CPU priority until it is next, so that a short
# first visit does not wait for the load; "when-next": only once the coordinator tells it that
# it is next, or sends it a task. A site loads nothing for runs it is not in before either
# (a cold cluster's sites then do not share the cores while the first hop's site loads).
Preload = Literal["eager", "when-scheduled", "when-next"]


_BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class SiteSettings(FileBackedSettings):
    """Everything `baton-site serve` needs. The agent only ever dials out to `coordinator`."""

    env_prefix = "BATON_SITE_"
    # Config-file keys may be the `baton-site serve` flag names.
    flag_names = {
        "ca": "ca_certificate",
        "cert": "certificate",
        "key": "private_key",
        "base_model": "base_model_dir",
        "threads": "num_threads",
        "approve": "approved_bundles",
    }

    coordinator: str = Field(min_length=3)  # host:port
    server_name: str | None = None  # name to check on the coordinator's certificate
    ca_certificate: Path
    certificate: Path
    private_key: Path
    data_dir: Path
    base_model_dir: Path | None = None  # LoRA tasks; a tabular-only site needs none
    device: str | None = None  # None: CUDA when present, else CPU
    num_threads: int | None = Field(default=None, ge=1)
    reconnect_max_seconds: float = Field(default=30.0, gt=0)
    # How long a finished hop's upload and result are retried while the coordinator is away.
    result_retry_seconds: float = Field(default=3600.0, ge=0)
    state_dir: Path | None = None  # default: <data_dir>/.baton-site
    # When to import torch and load the base model (see `Preload`); true/false as before
    # mean "eager"/"when-next" (false already left the loading to the first task).
    preload: Preload = "when-scheduled"
    # Approval is on by default: hops of unapproved run bundles are refused before any loading.
    require_approval: bool = True
    approved_bundles: list[str] = Field(default_factory=list)  # sha256 of approved bundles
    approval_policy: Path | None = None  # TOML rules that approve bundles without review
    max_upload_bytes: int = Field(default=512 * 1024**2, ge=1024)  # egress cap per adapter
    # No aggregate statistic over fewer rows than this leaves the site, whatever a request asks.
    min_aggregate_rows: int = Field(default=10, ge=1)
    # At most this many statistics answers per dataset (then `statistics-budget-exhausted`).
    max_statistics_answers: int = Field(default=20, ge=0)
    # Privacy budget per dataset of noised statistics answers, as (epsilon, delta)-DP.
    statistics_epsilon: float = Field(default=1.0, gt=0)
    statistics_delta: float = Field(default=1e-6, gt=0, lt=1)
    # How far the coordinator's clock may be ahead of this site's when a request expires.
    clock_skew_seconds: float = Field(default=120.0, ge=0)
    # Prometheus /metrics over HTTP: off unless a port is given (a site opens no port by default).
    metrics_host: str = "localhost"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_port_file: Path | None = None  # write the bound metrics port here (for port 0)
    # SIGTERM: how long a hop in training may run on before it is handed back to the coordinator.
    shutdown_grace: float = Field(default=30.0, ge=0)

    @field_validator("preload", mode="before")
    @classmethod
    def _preload_from_bool(cls, value: object) -> object:
        if isinstance(value, bool):
            return "eager" if value else "when-next"
        if isinstance(value, str) and value.strip().lower() in _BOOLEAN_WORDS:
            return "eager" if _BOOLEAN_WORDS[value.strip().lower()] else "when-next"
        return value

    @property
    def state_path(self) -> Path:
        return (self.state_dir or self.data_dir / ".baton-site") / "state.json"

    @property
    def approvals_path(self) -> Path:
        return self.state_path.parent / "approvals.json"

    @property
    def statistics_releases_path(self) -> Path:
        return self.state_path.parent / "statistics_releases.json"

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.ca_certificate, self.certificate, self.private_key)


def load_site_settings(config: Path | None, **flags: Any) -> SiteSettings:
    """Builds settings from an optional TOML file, then environment variables, then flags."""
    return load_settings(SiteSettings, config, **flags)
