"""The settings root: the TOML file -> one typed, validated ``Settings``.

Each section's dataclass and parser live with its component (store, otp,
delivery, channels, transports, limits...); all read through
otpd.settings_reader so every error names its full key. This module only
composes them, in a fixed order (the order of the errors reported).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otpd.app.control import DEFAULT_SOCKET, ControlSettings, parse_control_settings
from otpd.app.ddns_settings import DdnsSettings, parse_ddns_settings
from otpd.app.logsetup import LogSettings, parse_log_settings
from otpd.channels.email_settings import SmtpAccount, parse_smtp_account
from otpd.channels.sms.settings import SmsSettings, parse_sms_settings
from otpd.delivery.settings import DeliverySettings, parse_delivery_settings
from otpd.limits_settings import LimitSettings, parse_limit_settings
from otpd.metrics import MetricsSettings, parse_metrics_settings
from otpd.otp_settings import OtpSettings, parse_otp_settings
from otpd.settings_reader import ConfigError, Section, parse_toml
from otpd.store.settings import StoreSettings, parse_store_settings
from otpd.transports.settings import (
    DEFAULT_PATHS,
    BrokerSettings,
    ServerSettings,
    parse_broker_settings,
    parse_server_settings,
)

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_PATHS",
    "BrokerSettings",
    "ConfigError",
    "ControlSettings",
    "DdnsSettings",
    "DeliverySettings",
    "LimitSettings",
    "LogSettings",
    "MetricsSettings",
    "OtpSettings",
    "ServerSettings",
    "Settings",
    "SmsSettings",
    "SmtpAccount",
    "StoreSettings",
    "load_settings",
    "parse_settings",
]

DEFAULT_CONFIG = Path("/etc/otpd/otpd.toml")


@dataclass(frozen=True)
class Settings:
    server: ServerSettings
    store: StoreSettings
    otp: OtpSettings
    delivery: DeliverySettings
    smtp: tuple[SmtpAccount, ...]
    sms: SmsSettings
    log: LogSettings
    brokers: BrokerSettings = field(default_factory=BrokerSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    metrics: MetricsSettings = field(default_factory=lambda: MetricsSettings(True, True))
    control: ControlSettings = field(default_factory=lambda: ControlSettings(DEFAULT_SOCKET))
    ddns: DdnsSettings | None = None
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def load_settings(path: Path) -> Settings:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid UTF-8"]) from None
    return parse_settings(text, path)


def parse_settings(text: str, path: Path | None = None) -> Settings:
    data = parse_toml(text, path)
    errors: list[str] = []
    root = Section(data, "", errors)

    def table(name: str) -> Section:
        """A table that may be left out: read as empty, so defaults apply."""
        return root.section(name) or Section({}, name, errors)

    otp = parse_otp_settings(table("otp"))
    settings = Settings(
        server=parse_server_settings(table("server")),
        store=parse_store_settings(table("store")),
        otp=otp,
        delivery=parse_delivery_settings(table("delivery"), otp.default_lifetime,
                                         otp.max_lifetime),
        smtp=tuple(parse_smtp_account(s) for s in root.sections("smtp")),
        sms=parse_sms_settings(root.sections("modem"), root.section("sms"), otp.country_code),
        log=parse_log_settings(table("log")),
        limits=parse_limit_settings(root.section("limits"), otp.country_code),
        metrics=parse_metrics_settings(table("metrics")),
        control=parse_control_settings(table("control")),
        brokers=parse_broker_settings(root.section("amqp"), root.section("redis"),
                                      root.section("mqtt"), root.section("ws")),
        ddns=parse_ddns_settings(root.section("ddns")),
        source=path,
        raw=data,
    )
    _unique([a.name for a in settings.smtp], "smtp", errors)
    root.finish()
    if errors:
        raise ConfigError(errors)
    return settings


def _unique(names: list[str], path: str, errors: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            errors.append(f"{path}[{i}].name: duplicate name {name!r}")
        seen.add(name)
