"""What ``otpd check-config`` warns about in a file that is otherwise valid.

Two kinds of weakness a reviewer looks for first:

* secrets written inline in a file others can read: every secret-bearing key
  (passwords, PINs, tokens, signing keys, and URLs that carry a password);
* credentials that would cross the network in clear: a password sent to a
  host that is not loopback over a connection without TLS (SMTP with
  ``security = "none"``, ``amqp://``, ``redis://``, ``ws://``, MQTT without
  ``tls``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from otpd.netutil import is_loopback, url_password

if TYPE_CHECKING:
    from otpd.app.settings import Settings

# Keys named so (or ending in "_<name>") hold a secret when written inline.
SECRET_KEYS = ("password", "pin", "secret", "token", "api_key", "signing_key", "api_token")
# Keys whose value is a URL that may carry a password.
URL_KEYS = ("url", "redis_url", "server")


def inline_secrets(raw: object, path: str = "") -> list[str]:
    """Keys holding a secret written inline in the file."""
    found: list[str] = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            full = f"{path}.{key}" if path else key
            if isinstance(value, str) and value and _is_secret(key, value):
                found.append(full)
            else:
                found.extend(inline_secrets(value, full))
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            found.extend(inline_secrets(item, f"{path}[{i}]"))
    return found


def _is_secret(key: str, value: str) -> bool:
    if any(key == s or key.endswith("_" + s) for s in SECRET_KEYS):
        return True
    return key in URL_KEYS and url_password(value) != ""


def _clear_url(key: str, url: str, plain_schemes: tuple[str, ...],
               password: str = "") -> str | None:
    parts = urlsplit(url)
    if parts.scheme not in plain_schemes or not (password or url_password(url)):
        return None
    host = parts.hostname or ""
    if is_loopback(host):
        return None
    return (f"{key}: the password goes to {host} in clear ({parts.scheme}://);"
            f" use {parts.scheme}s:// (TLS)")


def clear_credentials(settings: Settings) -> list[str]:
    """Passwords that would be sent in clear to a host that is not loopback."""
    out: list[str] = []
    for i, account in enumerate(settings.smtp):
        if account.security == "none" and account.password and not is_loopback(account.host):
            out.append(f"smtp[{i}].security: \"none\" sends the password to {account.host} in"
                       " clear; use \"starttls\" or \"tls\"")
    b = settings.brokers
    if b.amqp is not None:
        out.append(_clear_url("amqp.url", b.amqp.url, ("amqp",)) or "")
    if b.redis is not None:
        out.append(_clear_url("redis.url", b.redis.url, ("redis",), b.redis.password) or "")
    if b.ws is not None:
        out.append(_clear_url("ws.url", b.ws.url, ("ws",), b.ws.password) or "")
    if b.mqtt is not None and b.mqtt.password and not b.mqtt.tls and not is_loopback(
            b.mqtt.host):
        out.append(f"mqtt.tls: the password goes to {b.mqtt.host} in clear; set tls = true")
    if settings.store.backend == "redis":
        out.append(_clear_url("store.redis_url", settings.store.redis_url, ("redis",)) or "")
    return [w for w in out if w]


def config_warnings(settings: Settings, config: Path) -> list[str]:
    warnings: list[str] = []
    secrets = inline_secrets(settings.raw)
    if secrets and config.stat().st_mode & 0o004:
        warnings.append(
            f"{config} is world-readable and holds secrets ({', '.join(secrets)}):"
            f" chmod 640 it, or use *_file / *_env keys"
        )
    warnings.extend(clear_credentials(settings))
    if not settings.server.users_file.exists() and settings.server.enabled:
        warnings.append(f"server.users_file: {settings.server.users_file} does not exist"
                        " (otpd passwd USER creates it)")
    return warnings
