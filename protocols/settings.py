"""Settings base both services share: an optional TOML file, then environment, then flags."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    TomlConfigSettingsSource,
)

__all__ = ["FileBackedSettings", "SettingsFileError", "load_settings", "settings_problems"]

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("_CONFIG_FILE", default=None)
SettingsT = TypeVar("SettingsT", bound="FileBackedSettings")


class SettingsFileError(ValueError):
    """A settings file that cannot be read: bad TOML, or one setting given under two names."""


class _FlagNamedTomlSource(TomlConfigSettingsSource):
    """A TOML file whose keys may be the command's flag names (`ca`, `base-model`) or fields."""

    def __init__(self, settings_cls: type[FileBackedSettings], toml_file: Path) -> None:
        self._flag_names = settings_cls.flag_names
        self._path_fields = {
            name
            for name, field in settings_cls.model_fields.items()
            if field.annotation is Path or Path in get_args(field.annotation)
        }
        super().__init__(settings_cls, toml_file)

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            raw = super()._read_file(file_path)
        except tomllib.TOMLDecodeError as exc:
            raise SettingsFileError(f"{file_path} is not valid TOML: {exc}") from exc
        settings: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for key, value in raw.items():
            field = key.replace("-", "_")
            field = self._flag_names.get(field, field)
            if field in settings:
                raise SettingsFileError(
                    f"{file_path}: {given_as[field]!r} and {key!r} are the same setting; keep one"
                )
            settings[field], given_as[field] = value, key
        # Relative paths name files beside the config file, wherever the service is started.
        base = Path(str(file_path)).parent
        for field, value in settings.items():
            if field in self._path_fields and isinstance(value, str) and value:
                settings[field] = str(base / value)
        return settings


class FileBackedSettings(BaseSettings):
    """Settings whose lowest-precedence source is the TOML file given to `load_settings`.

    The file's keys are the command's flag names (`ca = "ca.crt"`, `base-model = "..."`, dashes
    or underscores) or the field names; `flag_names` maps each flag that differs to its field.
    A relative path in the file is relative to the file's folder.
    """

    flag_names: ClassVar[Mapping[str, str]] = {}

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
        assert issubclass(settings_cls, FileBackedSettings)
        return (init_settings, env_settings, _FlagNamedTomlSource(settings_cls, config_file))


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
