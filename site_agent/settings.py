"""Site agent configuration: file, environment (BATON_SITE_*), then CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from protocols.settings import FileBackedSettings, load_settings
from protocols.transport import TlsFiles

__all__ = ["SiteSettings", "load_site_settings"]


class SiteSettings(FileBackedSettings):
    """Everything `baton-site serve` needs. The agent only ever dials out to `coordinator`."""

    model_config = SettingsConfigDict(env_prefix="BATON_SITE_", extra="forbid")

    coordinator: str = Field(min_length=3)  # host:port
    server_name: str | None = None  # name to check on the coordinator's certificate
    ca_certificate: Path
    certificate: Path
    private_key: Path
    data_dir: Path
    base_model_dir: Path
    device: str | None = None  # None: CUDA when present, else CPU
    num_threads: int | None = Field(default=None, ge=1)
    max_length: int = Field(default=64, ge=8, le=4096)
    validation_fraction: float = Field(default=0.2, gt=0, lt=1)
    split_seed: int = 0
    reconnect_max_seconds: float = Field(default=30.0, gt=0)

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.ca_certificate, self.certificate, self.private_key)


def load_site_settings(config: Path | None, **flags: Any) -> SiteSettings:
    """Builds settings from an optional TOML file, then environment variables, then flags."""
    return load_settings(SiteSettings, config, **flags)
