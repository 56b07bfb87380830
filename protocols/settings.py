"""Settings base both services share: an optional TOML file, then environment, then flags."""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

__all__ = ["FileBackedSettings", "load_settings", "settings_problems"]

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("_CONFIG_FILE", default=None)
SettingsT = TypeVar("SettingsT", bound="FileBackedSettings")


class FileBackedSettings(BaseSettings):
    """Settings whose lowest-precedence source is the TOML file given to `load_settings`."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = _CONFIG_FILE.get()
        if config_file is None:
            return (init_settings, env_settings)
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, config_file))


def load_settings(cls: type[SettingsT], config: Path | None, **flags: Any) -> SettingsT:
    """Builds `cls` from an optional TOML file, its environment variables, then non-None flags."""
    if config is not None and not config.is_file():
        raise FileNotFoundError(f"config file not found: {config}")
    token = _CONFIG_FILE.set(config)
    try:
        return cls(**{k: v for k, v in flags.items() if v is not None})
    finally:
        _CONFIG_FILE.reset(token)


def settings_problems(exc: ValidationError) -> str:
    """A settings validation error as one line, `field: problem; ...`, without the input values
    (which may hold a secret such as a database password)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
        for error in exc.errors()
    )
