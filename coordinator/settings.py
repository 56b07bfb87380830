"""Coordinator configuration: file, environment (BATON_*) and CLI flags, in rising precedence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from protocols.settings import FileBackedSettings, load_settings
from protocols.transport import TlsFiles

__all__ = ["CoordinatorSettings", "load_coordinator_settings"]


class CoordinatorSettings(FileBackedSettings):
    """Everything `baton coordinator serve` needs."""

    env_prefix = "BATON_"
    # Config-file keys may be the `baton coordinator serve` flag names.
    flag_names = {"ca": "ca_certificate", "cert": "certificate", "key": "private_key"}

    # localhost only by default: a coordinator is reachable from other hosts only when told to
    # (`host = "0.0.0.0"` or the interface's address; `baton provision` writes it).
    host: str = "localhost"
    port: int = Field(default=50051, ge=0, le=65535)
    state_dir: Path = Path("baton-state")
    database_url: str | None = None  # default: SQLite file inside state_dir
    ca_certificate: Path
    certificate: Path
    private_key: Path
    heartbeat_interval_ms: int = Field(default=2000, ge=100)
    max_checkpoint_bytes: int = Field(default=512 * 1024**2, ge=1024)
    # Stored bundles kept in the page cache (the last written or read, up to this many bytes;
    # None: as many as the kernel keeps): an upload's writes reuse the pages of older bundles
    # instead of growing the page cache, which costs a host fault per page on a virtual machine
    # whose host takes back free guest memory (`CheckpointStore`).
    store_cache_bytes: int | None = Field(default=1024**3, ge=0)
    # Holding the CA key here enables online certificate renewal (`baton-site cert renew`);
    # without it sites renew with the offline CSR flow (`baton pki sign`).
    ca_dir: Path | None = None
    port_file: Path | None = None  # write the bound port here once serving (for port 0)
    # Default minimum rows per released aggregate for statistics requests that name none.
    statistics_min_count: int = Field(default=10, ge=1)
    # A statistics request that names no expiry fails if not every site answered within this.
    statistics_expiry_seconds: float = Field(default=3600.0, ge=1, le=30 * 86400)
    # Retention (`baton store gc`): committed checkpoints kept per finished run besides its final.
    checkpoint_retention: int = Field(default=2, ge=0)
    # The ledger head is signed at every run transition and at least every this many events.
    ledger_head_every: int = Field(default=100, ge=1)
    # HTTP /healthz, /readyz and /metrics (no TLS, no data): off unless a port is given.
    metrics_host: str = "localhost"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_port_file: Path | None = None  # write the bound metrics port here (for port 0)
    # SIGTERM: seconds calls in flight (uploads, results) get to finish before the exit.
    shutdown_grace: float = Field(default=10.0, ge=0)
    # The admin dashboard (HTTPS with the coordinator's certificate); off with dashboard=false.
    dashboard: bool = True
    dashboard_host: str | None = None  # default: the same host as the gRPC server
    dashboard_port: int = Field(default=8443, ge=0, le=65535)
    dashboard_port_file: Path | None = None  # write the dashboard's bound port here
    # An admin certificate (`baton pki issue admin`) for the `baton study start` workers the
    # dashboard starts; without it the dashboard cannot start studies (and says so).
    study_admin_certificate: Path | None = None
    study_admin_key: Path | None = None

    @model_validator(mode="after")
    def _default_database(self) -> CoordinatorSettings:
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.state_dir / 'ledger.sqlite3').resolve()}"
        return self

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.ca_certificate, self.certificate, self.private_key)

    @property
    def checkpoint_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    @property
    def heads_path(self) -> Path:
        return self.state_dir / "ledger-heads.jsonl"

    @property
    def runs_dir(self) -> Path:
        return self.state_dir / "runs"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def load_coordinator_settings(config: Path | None, **flags: Any) -> CoordinatorSettings:
    """Builds settings from an optional TOML file, then environment variables, then flags."""
    return load_settings(CoordinatorSettings, config, **flags)
