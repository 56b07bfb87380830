"""Settings base both services share: an optional TOML file, then environment, then flags.

Plain pydantic models with their own three sources (the file, the environment variables named
by `env_prefix`, the given values): pydantic-settings imported every settings source and
provider it has (dotenv, the CLI source's argparse, secrets...) on each service's way to ready,
about a seventh of a coordinator's start and of a site's CPU to its hello.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from types import UnionType
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["FileBackedSettings", "SettingsFileError", "load_settings", "settings_problems"]

_CONFIG_FILE: ContextVar[Path | None] = ContextVar("_CONFIG_FILE", default=None)
SettingsT = TypeVar("SettingsT", bound="FileBackedSettings")


class SettingsFileError(ValueError):
    """Settings that cannot be read: bad TOML, one setting given under two names, or a list
    setting's environment variable that is not JSON."""


def _is_collection(annotation: object) -> bool:
    """Whether a field's value comes from its environment variable as JSON (a list, a dict...)."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        return any(_is_collection(arg) for arg in get_args(annotation))
    return isinstance(origin or annotation, type) and issubclass(
        origin or annotation,  # type: ignore[arg-type]
        (list, tuple, set, frozenset, dict, BaseModel),
    )


class FileBackedSettings(BaseModel):
    """Settings read from a TOML file (lowest precedence), then the environment, then the values
    given (`load_settings`' flags, or the constructor's arguments).

    The file's keys are the command's flag names (`ca = "ca.crt"`, `base-model = "..."`, dashes
    or underscores) or the field names; `flag_names` maps each flag that differs to its field.
    A relative path in the file is relative to the file's folder. A field's environment variable
    is `env_prefix` + its name, in any case; list fields take JSON (`["a", "b"]`).
    """

    model_config = ConfigDict(extra="forbid", validate_default=True)

    env_prefix: ClassVar[str] = ""
    flag_names: ClassVar[Mapping[str, str]] = {}

    def __init__(self, **values: Any) -> None:
        config_file = _CONFIG_FILE.get()
        merged = _read_file(type(self), config_file) if config_file is not None else {}
        merged.update(_read_environment(type(self)))
        merged.update(values)
        super().__init__(**merged)


def _read_environment(cls: type[FileBackedSettings]) -> dict[str, Any]:
    """The fields set by environment variables (their names in any case)."""
    environment = {name.lower(): value for name, value in os.environ.items()}
    prefix = cls.env_prefix.lower()
    values: dict[str, Any] = {}
    for name, field in cls.model_fields.items():
        value = environment.get(prefix + name)
        if value is None:
            continue
        if _is_collection(field.annotation):
            try:
                values[name] = json.loads(value)
            except ValueError:
                raise SettingsFileError(
                    f"environment variable {(prefix + name).upper()} is not JSON "
                    '(write a list as ["a", "b"])'
                ) from None
        else:
            values[name] = value
    return values


def _read_file(cls: type[FileBackedSettings], path: Path) -> dict[str, Any]:
    """A TOML file's settings under their field names (its keys may be the flag names)."""
    try:
        with path.open("rb") as stream:
            raw = tomllib.load(stream)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsFileError(f"{path} is not valid TOML: {exc}") from exc
    path_fields = {
        name
        for name, field in cls.model_fields.items()
        if field.annotation is Path or Path in get_args(field.annotation)
    }
    settings: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in raw.items():
        field = key.replace("-", "_")
        field = cls.flag_names.get(field, field)
        if field in settings:
            raise SettingsFileError(
                f"{path}: {given_as[field]!r} and {key!r} are the same setting; keep one"
            )
        settings[field], given_as[field] = value, key
    # Relative paths name files beside the config file, wherever the service is started.
    for field, value in settings.items():
        if field in path_fields and isinstance(value, str) and value:
            settings[field] = str(path.parent / value)
    return settings


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
