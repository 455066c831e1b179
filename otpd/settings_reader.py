"""Typed reading of one TOML table, collecting errors that name the full key.

Every section parser in otpd uses :class:`Section` so that a bad value is
reported as ``smtp[0].port: must be 1..65535`` and a typo as an unknown key,
instead of a traceback or a silently ignored setting.
"""

from __future__ import annotations

import builtins
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """Raised with every problem found, one per line, each naming its key."""

    def __init__(self, errors: Sequence[str]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(self.errors))


class Section:
    """A TOML table being read; records errors instead of raising."""

    def __init__(
        self, data: Mapping[builtins.str, Any], path: builtins.str, errors: list[builtins.str]
    ) -> None:
        self.data = data
        self.path = path
        self.errors = errors
        self._seen: set[builtins.str] = set()

    # -- helpers -----------------------------------------------------------
    def key(self, key: builtins.str) -> builtins.str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: builtins.str, message: builtins.str) -> None:
        self.errors.append(f"{self.key(key)}: {message}")

    def has(self, key: builtins.str) -> builtins.bool:
        return key in self.data

    def _get(self, key: builtins.str) -> Any:
        self._seen.add(key)
        return self.data.get(key)

    # -- scalar readers ----------------------------------------------------
    def str(
        self,
        key: builtins.str,
        default: builtins.str,
        *,
        choices: Sequence[builtins.str] | None = None,
        required: builtins.bool = False,
    ) -> builtins.str:
        value = self._get(key)
        if value is None:
            if required:
                self.error(key, "is required")
            return default
        if not isinstance(value, builtins.str):
            self.error(key, "must be a string")
            return default
        if required and not value.strip():
            self.error(key, "must not be empty")
        if choices is not None and value not in choices:
            self.error(key, f"must be one of {', '.join(repr(c) for c in choices)}")
            return default
        return value

    def int(
        self,
        key: builtins.str,
        default: builtins.int,
        *,
        min: builtins.int | None = None,
        max: builtins.int | None = None,
    ) -> builtins.int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, builtins.bool) or not isinstance(value, builtins.int):
            self.error(key, "must be an integer")
            return default
        if (min is not None and value < min) or (max is not None and value > max):
            self.error(key, _range_text(min, max))
            return default
        return value

    def float(
        self,
        key: builtins.str,
        default: builtins.float,
        *,
        min: builtins.float | None = None,
        max: builtins.float | None = None,
    ) -> builtins.float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, builtins.bool) or not isinstance(value, builtins.int | builtins.float):
            self.error(key, "must be a number")
            return default
        if (min is not None and value < min) or (max is not None and value > max):
            self.error(key, _range_text(min, max))
            return default
        return float(value)

    def bool(self, key: builtins.str, default: builtins.bool) -> builtins.bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, builtins.bool):
            self.error(key, "must be true or false")
            return default
        return value

    def str_list(
        self, key: builtins.str, default: Sequence[builtins.str] = ()
    ) -> list[builtins.str]:
        value = self._get(key)
        if value is None:
            return list(default)
        if not isinstance(value, list) or not all(isinstance(v, builtins.str) for v in value):
            self.error(key, "must be a list of strings")
            return list(default)
        return list(value)

    def host_port(
        self, key: builtins.str, default: builtins.str
    ) -> tuple[builtins.str, builtins.int]:
        text = self.str(key, default)
        host, sep, port_text = text.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            self.error(key, "must be HOST:PORT with a port 0..65535")
            host, _, port_text = default.rpartition(":")
            return host.strip("[]"), builtins.int(port_text)
        return host, builtins.int(port_text)

    def secret(self, key: builtins.str, default: builtins.str = "") -> builtins.str:
        """A secret given inline (``key``), in a file (``key_file``) or in the
        environment (``key_env`` names the variable). At most one may be set."""
        inline = self._get(key)
        file_ = self._get(f"{key}_file")
        env = self._get(f"{key}_env")
        given = [k for k, v in ((key, inline), (f"{key}_file", file_), (f"{key}_env", env)) if v]
        if len(given) > 1:
            self.error(key, f"give only one of {', '.join(given)}")
            return default
        if inline is not None and not isinstance(inline, builtins.str):
            self.error(key, "must be a string")
            return default
        if file_:
            if not isinstance(file_, builtins.str):
                self.error(f"{key}_file", "must be a path string")
                return default
            try:
                return Path(file_).read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                self.error(f"{key}_file", f"cannot read {file_}: {exc.strerror}")
                return default
        if env:
            if not isinstance(env, builtins.str):
                self.error(f"{key}_env", "must be an environment variable name")
                return default
            if env not in os.environ:
                self.error(f"{key}_env", f"environment variable {env} is not set")
                return default
            return os.environ[env]
        return inline if isinstance(inline, builtins.str) else default

    # -- nested tables -----------------------------------------------------
    def section(self, key: builtins.str) -> Section | None:
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.error(key, "must be a table ([" + self.key(key) + "])")
            return None
        return Section(value, self.key(key), self.errors)

    def sections(self, key: builtins.str) -> list[Section]:
        value = self._get(key)
        if value is None:
            return []
        if isinstance(value, Mapping):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            self.error(key, "must be an array of tables ([[" + self.key(key) + "]])")
            return []
        return [Section(v, f"{self.key(key)}[{i}]", self.errors) for i, v in enumerate(value)]

    def finish(self) -> None:
        """Report keys that nothing read: almost always a typo."""
        for key in self.data:
            if key not in self._seen:
                self.error(key, "unknown key")


def _range_text(min: float | None, max: float | None) -> str:
    if min is not None and max is not None:
        return f"must be {min}..{max}"
    if min is not None:
        return f"must be >= {min}"
    return f"must be <= {max}"


def parse_toml(text: str, path: object = None) -> dict[str, Any]:
    """TOML text -> tables; any problem is a ConfigError naming the file."""
    where = path or "config"
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{where}: invalid TOML: {exc}"]) from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError([f"{where}: invalid TOML: nested too deeply"]) from None
