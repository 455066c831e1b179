"""TOML configuration -> typed, validated settings. Every error names its key."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from otpd.app.ddns_settings import DdnsSettings, parse_ddns_settings
from otpd.channels.sms.settings import SmsSettings, parse_sms_settings
from otpd.limits import LimitSettings, parse_limit_settings
from otpd.settings_reader import ConfigError, Section
from otpd.transports.settings import BrokerSettings, parse_broker_settings

DEFAULT_CONFIG = Path("/etc/otpd/otpd.toml")
DEFAULT_PATHS = ("/api/otp", "/api/message", "/api/sms", "/api/email", "/api/block", "/api/unblock")


@dataclass(frozen=True)
class ServerSettings:
    enabled: bool
    host: str
    port: int
    users_file: Path
    max_body: int
    tls_cert: str
    tls_key: str
    paths: tuple[str, ...]
    allow_plain_http: bool


@dataclass(frozen=True)
class StoreSettings:
    path: Path  # the local SQLite file: everything, or the outbox alone with backend redis
    backend: str  # sqlite | redis
    redis_url: str = field(repr=False)
    redis_prefix: str
    purge_interval: float
    expired_grace: float  # keep expired OTPs this long so verify says 1203, not 1202
    retention: float  # keep final outbox rows (for duplicate-id detection) this long


@dataclass(frozen=True)
class OtpSettings:
    length: int
    default_lifetime: int
    max_lifetime: int
    max_attempts: int
    key_file: Path
    country_code: str
    email_subject: str


@dataclass(frozen=True)
class DeliverySettings:
    wait: float
    email_workers: int
    retry_base: float
    retry_max: float
    default_lifetime: int  # for send-* without expiration
    max_lifetime: int


@dataclass(frozen=True)
class SmtpAccount:
    name: str
    host: str
    port: int
    security: str  # none | starttls | tls
    username: str
    password: str
    sender: str
    timeout: float
    validate_certs: bool


@dataclass(frozen=True)
class LogSettings:
    level: str


@dataclass(frozen=True)
class MetricsSettings:
    enabled: bool
    require_auth: bool  # /metrics behind the REST users file (healthz/readyz never are)


@dataclass(frozen=True)
class ControlSettings:
    socket: Path  # Unix socket for the operator CLI (otpd status, block, outbox...)


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
    control: ControlSettings = field(
        default_factory=lambda: ControlSettings(Path("/run/otpd/control.sock")))
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
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path or 'config'}: invalid TOML: {exc}"]) from None
    errors: list[str] = []
    root = Section(data, "", errors)
    otp = _otp(root.section("otp") or Section({}, "otp", errors))
    settings = Settings(
        server=_server(root.section("server") or Section({}, "server", errors)),
        store=_store(root.section("store") or Section({}, "store", errors)),
        otp=otp,
        delivery=_delivery(root.section("delivery") or Section({}, "delivery", errors), otp),
        smtp=tuple(_smtp(s) for s in root.sections("smtp")),
        sms=parse_sms_settings(root.sections("modem"), root.section("sms"), otp.country_code),
        log=_log(root.section("log") or Section({}, "log", errors)),
        limits=parse_limit_settings(root.section("limits"), otp.country_code),
        metrics=_metrics(root.section("metrics") or Section({}, "metrics", errors)),
        control=_control(root.section("control") or Section({}, "control", errors)),
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


def _server(s: Section) -> ServerSettings:
    host, port = s.host_port("listen", "127.0.0.1:8899")
    paths = tuple(s.str_list("paths", DEFAULT_PATHS))
    for p in paths:
        if not p.startswith("/"):
            s.error("paths", f"{p!r} must start with /")
    cert, key = s.str("tls_cert", ""), s.str("tls_key", "")
    if bool(cert) != bool(key):
        s.error("tls_cert" if not cert else "tls_key", "tls_cert and tls_key must be set together")
    allow_plain = s.bool("allow_plain_http", False)
    if not cert and not allow_plain and not _is_loopback(host):
        s.error("listen", f"{host} is not a loopback address: Basic auth passwords would cross"
                " the network in clear; set tls_cert and tls_key, or allow_plain_http = true"
                " (only behind a TLS-terminating proxy)")
    out = ServerSettings(
        allow_plain_http=allow_plain,
        enabled=s.bool("enabled", True),
        host=host,
        port=port,
        users_file=Path(s.str("users_file", "/etc/otpd/users")),
        max_body=s.int("max_body", 65536, min=1024, max=16 * 1024 * 1024),
        tls_cert=cert,
        tls_key=key,
        paths=paths,
    )
    s.finish()
    return out


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _store(s: Section) -> StoreSettings:
    backend = s.str("backend", "sqlite", choices=("sqlite", "redis"))
    redis_url = s.secret("redis_url", "redis://127.0.0.1:6379/0")
    if backend == "redis" and not redis_url.startswith(("redis://", "rediss://", "unix://")):
        s.error("redis_url", "must start with redis://, rediss:// or unix://")
    out = StoreSettings(
        path=Path(s.str("path", "/var/lib/otpd/otpd.db")),
        backend=backend,
        redis_url=redis_url,
        redis_prefix=s.str("redis_prefix", "otpd:"),
        purge_interval=s.float("purge_interval", 60.0, min=1.0, max=86400.0),
        expired_grace=s.float("expired_grace", 3600.0, min=0.0, max=30 * 86400.0),
        retention=s.float("retention", 7 * 86400.0, min=3600.0, max=366 * 86400.0),
    )
    s.finish()
    return out


def _otp(s: Section) -> OtpSettings:
    country = s.str("country_code", "62")
    if not (country.isdigit() and country.isascii() and 1 <= len(country) <= 3):
        s.error("country_code", "must be 1 to 3 digits, e.g. \"62\"")
        country = "62"
    default_lifetime = s.int("default_lifetime", 300, min=10, max=86400)
    max_lifetime = s.int("max_lifetime", 600, min=10, max=86400)
    if max_lifetime < default_lifetime:
        s.error("max_lifetime", "must be >= otp.default_lifetime")
    out = OtpSettings(
        length=s.int("length", 6, min=4, max=10),
        default_lifetime=default_lifetime,
        max_lifetime=max_lifetime,
        max_attempts=s.int("max_attempts", 5, min=1, max=100),
        key_file=Path(s.str("key_file", "/var/lib/otpd/otp.key")),
        country_code=country,
        email_subject=s.str("email_subject", "Your OTP code"),
    )
    s.finish()
    return out


def _delivery(s: Section, otp: OtpSettings) -> DeliverySettings:
    default_lifetime = s.int("default_lifetime", otp.default_lifetime, min=10, max=7 * 86400)
    max_lifetime = s.int("max_lifetime", max(otp.max_lifetime, 3600), min=10, max=7 * 86400)
    if max_lifetime < default_lifetime:
        s.error("max_lifetime", "must be >= delivery.default_lifetime")
    out = DeliverySettings(
        wait=s.float("wait", 20.0, min=0.0, max=300.0),
        email_workers=s.int("email_workers", 2, min=1, max=32),
        retry_base=s.float("retry_base", 2.0, min=0.1, max=600.0),
        retry_max=s.float("retry_max", 60.0, min=0.1, max=3600.0),
        default_lifetime=default_lifetime,
        max_lifetime=max_lifetime,
    )
    s.finish()
    return out


def _smtp(s: Section) -> SmtpAccount:
    security = s.str("security", "none", choices=("none", "starttls", "tls"))
    default_port = {"none": 25, "starttls": 587, "tls": 465}[security]
    sender = s.str("sender", "", required=True)
    if sender and "@" not in parseaddr(sender)[1]:
        s.error("sender", 'must be an address, e.g. "OTP <otp@example.com>"')
    username = s.str("username", "")
    out = SmtpAccount(
        name=s.str("name", f"{s.path}"),
        host=s.str("host", "127.0.0.1"),
        port=s.int("port", default_port, min=1, max=65535),
        security=security,
        username=username,
        password=s.secret("password"),
        sender=sender,
        timeout=s.float("timeout", 30.0, min=1.0, max=600.0),
        validate_certs=s.bool("validate_certs", True),
    )
    s.finish()
    return out


def _metrics(s: Section) -> MetricsSettings:
    out = MetricsSettings(enabled=s.bool("enabled", True),
                          require_auth=s.bool("require_auth", True))
    s.finish()
    return out


def _control(s: Section) -> ControlSettings:
    out = ControlSettings(socket=Path(s.str("socket", "/run/otpd/control.sock")))
    s.finish()
    return out


def _log(s: Section) -> LogSettings:
    out = LogSettings(
        level=s.str("level", "info", choices=("debug", "info", "warning", "error")),
    )
    s.finish()
    return out


def _unique(names: list[str], path: str, errors: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            errors.append(f"{path}[{i}].name: duplicate name {name!r}")
        seen.add(name)

