"""Client configuration: TOML -> typed, validated settings; every error names its key.

The publisher library (:class:`otpd.client.AsyncOtpClient`) and ``otpd client``
read one TOML file, in the same style as the daemon's. Unknown keys are
errors. Every secret (``password``, ``url``, ``signing_key``, ``secret_key``)
may be given inline, from a file (``password_file = "..."``) or from the
environment (``password_env = "VAR"``); give only one of the three.
Only the table of the chosen ``method`` is used (a missing one means its
defaults). Example (``etc/otpd-client.example.toml``)::

    # otpd client: the publisher library and `otpd client ...` commands.
    # Check it with: otpd client check-config --config FILE

    [client]
    method = "rest"               # rest | amqp | redis | mqtt | ws
    timeout = 30                  # s to wait for an answer (> the daemon's delivery.wait)
    connect_timeout = 10          # s to connect, subscribe and publish
    wait_result = false           # brokers: request-otp, send-* and block wait for the daemon's
                                  #   answer (true) or return 1111 once published (false);
                                  #   verify-otp and modem-list always wait; REST always answers
    callback_delay = 0            # ms the daemon waits before answering (we subscribe first)
    signing_key = ""              # or signing_key_file / signing_key_env: sign every command
                                  #   (for a daemon broker with require_signature = true) and
                                  #   take only answers the daemon signed with the same key

    [manage_otp]                  # the library makes and checks the OTPs (OTP-Publisher's
    enabled = false               #   manage_otp): request-otp is sent as send-message
    store = "sqlite"              # sqlite: one app server | redis: app servers sharing a Redis
    path = "/var/lib/otpd-client/otp.db"    # sqlite file (created 0600)
    redis_url = "redis://127.0.0.1:6379/0"  # redis store; a secret (redis_url_file / _env)
    key_prefix = "otpd-client:otp:"         # redis store: key prefix
    secret_key_file = "/etc/otpd/client-otp.key"  # HMAC key, >= 16 characters, the same on
                                  #   every app server; make one with: python3 -c
                                  #   'import secrets; print(secrets.token_urlsafe(32))'
    length = 6                    # digits, 4..10
    max_attempts = 5              # wrong codes before the OTP is burned (1204)
    max_lifetime = 600            # s, longer lifetimes are clamped
    keep_expired = 3600           # s an expired or used OTP is kept (1203, duplicate reference)
    country_code = "62"           # receivers are bound in E.164 form: 0812... = +62812...
    subject = ""                  # email subject; "" = the daemon's otp.email_subject

    [rest]
    url = "http://127.0.0.1:8899/api/otp"
    username = "app"
    password_file = "/etc/otpd/client-rest.pass"
    verify_tls = true             # https: check the server certificate
    tls_ca = ""                   # CA bundle for a private CA; "" = system store

    [amqp]                        # RabbitMQ: persistent, publisher confirms, reply_to answers
    url = "amqp://guest:guest@127.0.0.1:5672/"  # amqps:// for TLS; a secret
    topic = "sms"                 # the daemon's [amqp] topic (its durable queue)
    tls_ca = ""

    [redis]
    url = "redis://127.0.0.1:6379/0"  # rediss:// for TLS; a secret
    username = ""                 # Redis 6 ACL user (overrides the URL's)
    password = ""
    topic = "sms"                 # the daemon's [redis] topic
    mode = "pubsub"               # as the daemon's [redis] mode: pubsub | stream
    stream_maxlen = 10000         # stream mode: the command stream is trimmed to about this
    tls_ca = ""

    [mqtt]
    host = "127.0.0.1"
    port = 1883                   # 8883 with TLS
    username = ""
    password = ""
    topic = "sms"                 # the daemon's [mqtt] topic
    client_id = "otpd-client"     # prefix; each connection adds a random suffix
    qos = 1                       # 1: the broker acknowledges every command
    tls = false
    tls_ca = ""
    keepalive = 30                # s

    [ws]                          # a WSMessageBroker (`otpd broker`)
    url = "ws://127.0.0.1:9000/ws"  # wss:// for TLS; ?topic= is added
    username = ""
    password = ""
    topic = "sms"                 # the daemon's [ws] topic
    tls_ca = ""
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from otpd.otp_attempts import DEFAULT_MAX_ATTEMPTS
from otpd.settings_reader import ConfigError, Section, parse_toml
from otpd.wire.brokers import DEFAULT_TOPIC

METHODS = ("rest", "amqp", "redis", "mqtt", "ws")
DEFAULT_CLIENT_CONFIG = Path("/etc/otpd/client.toml")
MIN_SECRET_KEY = 16


@dataclass(frozen=True)
class RestSettings:
    url: str = "http://127.0.0.1:8899/api/otp"
    username: str = ""
    password: str = field(default="", repr=False)
    verify_tls: bool = True
    tls_ca: str = ""


@dataclass(frozen=True)
class AmqpSettings:
    url: str = field(default="amqp://guest:guest@127.0.0.1:5672/", repr=False)
    topic: str = DEFAULT_TOPIC
    tls_ca: str = ""


@dataclass(frozen=True)
class RedisSettings:
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    username: str = ""
    password: str = field(default="", repr=False)
    topic: str = DEFAULT_TOPIC
    mode: str = "pubsub"  # pubsub | stream
    stream_maxlen: int = 10000
    tls_ca: str = ""


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = field(default="", repr=False)
    topic: str = DEFAULT_TOPIC
    client_id: str = "otpd-client"
    qos: int = 1
    tls: bool = False
    tls_ca: str = ""
    keepalive: int = 30


@dataclass(frozen=True)
class WsSettings:
    url: str = "ws://127.0.0.1:9000/ws"
    username: str = ""
    password: str = field(default="", repr=False)
    topic: str = DEFAULT_TOPIC
    tls_ca: str = ""


@dataclass(frozen=True)
class ManageOtpSettings:
    enabled: bool = False
    store: str = "sqlite"  # sqlite | redis
    path: Path = Path("/var/lib/otpd-client/otp.db")
    redis_url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    key_prefix: str = "otpd-client:otp:"
    secret_key: str = field(default="", repr=False)
    length: int = 6
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_lifetime: int = 600
    keep_expired: int = 3600
    country_code: str = "62"
    subject: str = ""


@dataclass(frozen=True)
class ClientSettings:
    method: str = "rest"
    timeout: float = 30.0
    connect_timeout: float = 10.0
    wait_result: bool = False
    callback_delay: int = 0
    signing_key: str = field(default="", repr=False)
    rest: RestSettings = field(default_factory=RestSettings)
    amqp: AmqpSettings = field(default_factory=AmqpSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    ws: WsSettings = field(default_factory=WsSettings)
    manage_otp: ManageOtpSettings = field(default_factory=ManageOtpSettings)
    source: Path | None = None

    def with_method(self, method: str) -> ClientSettings:
        """The same settings over another method (``--method``)."""
        if method not in METHODS:
            raise ConfigError([f"client.method: must be one of {', '.join(METHODS)}"])
        return replace(self, method=method)


def default_config_path() -> Path:
    return Path(os.environ.get("OTPD_CLIENT_CONFIG", str(DEFAULT_CLIENT_CONFIG)))


def load_client_config(path: Path | str, method: str | None = None) -> ClientSettings:
    """Read and validate ``path``; raises ConfigError listing every bad key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not valid UTF-8"]) from None
    config = parse_client_config(text, path)
    return config.with_method(method) if method else config


def parse_client_config(text: str | Mapping[str, Any], path: Path | None = None) -> ClientSettings:
    """TOML text (or an already parsed table) -> ClientSettings."""
    if isinstance(text, str):
        data: Mapping[str, Any] = parse_toml(text, path)
    else:
        data = text
    errors: list[str] = []
    root = Section(data, "", errors)

    def table(name: str) -> Section:
        return root.section(name) or Section({}, name, errors)

    client = table("client")
    method = client.str("method", "rest", choices=METHODS)
    timeout = client.float("timeout", 30.0, min=0.1, max=3600.0)
    connect_timeout = client.float("connect_timeout", 10.0, min=0.1, max=600.0)
    wait_result = client.bool("wait_result", False)
    callback_delay = client.int("callback_delay", 0, min=0, max=10_000)
    signing_key = client.secret("signing_key")
    client.finish()
    config = ClientSettings(
        method=method,
        timeout=timeout,
        connect_timeout=connect_timeout,
        wait_result=wait_result,
        callback_delay=callback_delay,
        signing_key=signing_key,
        rest=_rest(table("rest")),
        amqp=_amqp(table("amqp")),
        redis=_redis(table("redis")),
        mqtt=_mqtt(table("mqtt")),
        ws=_ws(table("ws")),
        manage_otp=_manage(table("manage_otp")),
        source=path,
    )
    root.finish()
    if errors:
        raise ConfigError(errors)
    return config


# -- tables ------------------------------------------------------------------


def _topic(s: Section) -> str:
    topic = s.str("topic", DEFAULT_TOPIC)
    if not topic.strip() or len(topic) > 255 or not topic.isprintable():
        s.error("topic", "must be 1..255 printable characters")
        return DEFAULT_TOPIC
    return topic


def _url(s: Section, key: str, value: str, default: str, schemes: tuple[str, ...]) -> str:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        s.error(key, "is not a valid URL (bad port?)")
        return default
    if parts.scheme not in schemes:
        s.error(key, "must start with " + " or ".join(f"{x}://" for x in schemes))
        return default
    if parts.scheme != "unix" and not parts.hostname:
        s.error(key, "must name a host")
        return default
    return value


def _rest(s: Section) -> RestSettings:
    d = RestSettings()
    out = RestSettings(
        url=_url(s, "url", s.str("url", d.url), d.url, ("http", "https")),
        username=s.str("username", ""),
        password=s.secret("password"),
        verify_tls=s.bool("verify_tls", True),
        tls_ca=s.str("tls_ca", ""),
    )
    if ":" in out.username:
        s.error("username", "must not contain ':' (HTTP Basic)")
    s.finish()
    return out


def _amqp(s: Section) -> AmqpSettings:
    d = AmqpSettings()
    out = AmqpSettings(
        url=_url(s, "url", s.secret("url", d.url), d.url, ("amqp", "amqps")),
        topic=_topic(s),
        tls_ca=s.str("tls_ca", ""),
    )
    s.finish()
    return out


def _redis(s: Section) -> RedisSettings:
    d = RedisSettings()
    out = RedisSettings(
        url=_url(s, "url", s.secret("url", d.url), d.url, ("redis", "rediss", "unix")),
        username=s.str("username", ""),
        password=s.secret("password"),
        topic=_topic(s),
        mode=s.str("mode", "pubsub", choices=("pubsub", "stream")),
        stream_maxlen=s.int("stream_maxlen", 10000, min=1, max=100_000_000),
        tls_ca=s.str("tls_ca", ""),
    )
    s.finish()
    return out


def _mqtt(s: Section) -> MqttSettings:
    tls_ca = s.str("tls_ca", "")
    tls = s.bool("tls", False) or bool(tls_ca)
    host = s.str("host", "127.0.0.1")
    if not host.strip():
        s.error("host", "must not be empty")
        host = "127.0.0.1"
    client_id = s.str("client_id", "otpd-client")
    if not client_id.strip() or len(client_id) > 64:
        s.error("client_id", "must be 1..64 characters (a random suffix is added)")
        client_id = "otpd-client"
    topic = _topic(s)
    if any(c in topic for c in "+#"):
        s.error("topic", "must not contain MQTT wildcards (+ or #)")
    out = MqttSettings(
        host=host,
        port=s.int("port", 8883 if tls else 1883, min=1, max=65535),
        username=s.str("username", ""),
        password=s.secret("password"),
        topic=topic,
        client_id=client_id,
        qos=s.int("qos", 1, min=0, max=1),
        tls=tls,
        tls_ca=tls_ca,
        keepalive=s.int("keepalive", 30, min=5, max=3600),
    )
    s.finish()
    return out


def _ws(s: Section) -> WsSettings:
    d = WsSettings()
    out = WsSettings(
        url=_url(s, "url", s.str("url", d.url), d.url, ("ws", "wss")),
        username=s.str("username", ""),
        password=s.secret("password"),
        topic=_topic(s),
        tls_ca=s.str("tls_ca", ""),
    )
    s.finish()
    return out


def _manage(s: Section) -> ManageOtpSettings:
    d = ManageOtpSettings()
    enabled = s.bool("enabled", False)
    store = s.str("store", "sqlite", choices=("sqlite", "redis"))
    redis_url = s.secret("redis_url", d.redis_url)
    if store == "redis":
        redis_url = _url(s, "redis_url", redis_url, d.redis_url, ("redis", "rediss", "unix"))
    secret_key = s.secret("secret_key")
    if enabled and not secret_key:
        s.error("secret_key", "is required when enabled = true (or secret_key_file /"
                              " secret_key_env), the same on every app server")
    elif secret_key and len(secret_key.encode()) < MIN_SECRET_KEY:
        s.error("secret_key", f"must have at least {MIN_SECRET_KEY} characters")
    country = s.str("country_code", "62")
    if not (country.isdigit() and country.isascii() and 1 <= len(country) <= 3):
        s.error("country_code", 'must be 1 to 3 digits, e.g. "62"')
        country = "62"
    path = s.str("path", str(d.path))
    if not path.strip():
        s.error("path", "must not be empty")
        path = str(d.path)
    out = ManageOtpSettings(
        enabled=enabled,
        store=store,
        path=Path(path),
        redis_url=redis_url,
        key_prefix=s.str("key_prefix", d.key_prefix),
        secret_key=secret_key,
        length=s.int("length", 6, min=4, max=10),
        max_attempts=s.int("max_attempts", DEFAULT_MAX_ATTEMPTS, min=1, max=100),
        max_lifetime=s.int("max_lifetime", 600, min=1, max=7 * 86400),
        keep_expired=s.int("keep_expired", 3600, min=0, max=30 * 86400),
        country_code=country,
        subject=s.str("subject", ""),
    )
    s.finish()
    return out


# The names before the library said "Settings" like the daemon; users may import them.
RestConfig = RestSettings
AmqpConfig = AmqpSettings
RedisConfig = RedisSettings
MqttConfig = MqttSettings
WsConfig = WsSettings
ManageOtpConfig = ManageOtpSettings
ClientConfig = ClientSettings
