"""The generic machinery of a YAML config file: read it, and typed access to a section.

Nothing here knows ramp-board's sections: :mod:`.config` (server and event
files), each worker type (its ``worker`` section) and :mod:`.leaderboard` build
on it. It imports nothing of the package but :mod:`.errors`, so every module may
import it without a cycle. YAML is imported on first read: a worker module that
only parses a :class:`Section` does not pay for it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

from .errors import UserError

log = logging.getLogger("ramp_dispatcher.config")  # the name operators filter on

T = TypeVar("T")


class ConfigError(UserError):
    """A config file cannot be used; the message names the file and the key."""


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml  # deferred: see the module's docstring

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: invalid YAML{at}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


class Section:
    """Typed access to one section of a config file, tracking unknown keys."""

    def __init__(self, path: Path, name: str, data: Any, *, required: bool = True):
        self.path = path
        self.name = name
        if data is None and not required:
            data = {}
        if data is None:
            raise ConfigError(f"{path}: missing section '{name}'")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: section '{name}' must be a mapping")
        self.data: dict[str, Any] = data
        self._used: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.path}: key '{self.name}.{key}'"

    def invalid(self, exc: InvalidSetting) -> ConfigError:
        """The file's error for a value a config dataclass refused."""
        return ConfigError(f"{self.where(exc.key)} {exc.message}")

    def _convert(self, key: str, value: Any, kind: Callable[[Any], T], type_name: str) -> T:
        ok = {
            bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
        }.get(kind, lambda v: True)(value)
        if not ok:
            raise ConfigError(
                f"{self.where(key)} must be {type_name}, got {type(value).__name__} {value!r}"
            )
        return kind(value)

    def value(self, key: str) -> Any:
        """The raw value (or None) of a key whose type the caller checks."""
        self._used.add(key)
        return self.data.get(key)

    def required(self, key: str, kind: Callable[[Any], T], type_name: str) -> T:
        self._used.add(key)
        if key not in self.data or self.data[key] is None:
            raise ConfigError(f"{self.where(key)} is required")
        return self._convert(key, self.data[key], kind, type_name)

    def optional(self, key: str, kind: Callable[[Any], T], type_name: str, default: T) -> T:
        self._used.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        return self._convert(key, self.data[key], kind, type_name)

    def choice(self, key: str, choices: tuple[Any, ...], default: Any) -> Any:
        self._used.add(key)
        value = self.data.get(key, default)
        if value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{self.where(key)} must be one of {shown}, got {value!r}")
        return value

    def path_key(self, key: str, default: Path, base: Path) -> Path:
        value = self.optional(key, str, "a path", None)  # type: ignore[arg-type]
        if value is None:
            return default
        path = Path(os.path.expanduser(value))
        return path if path.is_absolute() else base / path

    def warn_unknown(self, allowed: set[str] | None = None) -> None:
        known = self._used | (allowed or set())
        for key in self.data:
            if key not in known:
                log.warning("%s: unknown key '%s.%s' (ignored)", self.path, self.name, key)


class InvalidSetting(ValueError):
    """A config dataclass refuses one value; ``key`` names it within its section.

    Raised by a worker type's config dataclass (which knows no file);
    :meth:`Section.invalid` turns it into a :class:`ConfigError` naming the
    file and the key.
    """

    def __init__(self, key: str, message: str):
        super().__init__(f"'{key}' {message}")
        self.key = key
        self.message = message
