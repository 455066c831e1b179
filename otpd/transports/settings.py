"""``[server]`` (REST) and the ``[amqp]``, ``[redis]``, ``[mqtt]`` and ``[ws]`` tables ->
frozen, validated settings.

Each table present enables that consumer (``enabled = false`` keeps it
configured but off). Keys every table shares:

``topic`` ("sms"), ``enabled`` (true), ``prefetch`` (64: most commands in
flight at once; the store commits them in groups, so a wider window means
fewer, larger commits), ``max_message`` (65536 bytes; bigger messages are dropped),
``reconnect_min``/``reconnect_max`` (1 / 60 s backoff), ``retry_delay`` (1 s
before a command the store could not take is handed back for redelivery),
``reply_wait`` (seconds to wait for the send result when a reply is wanted;
default ``delivery.wait``), ``require_signature`` (false) and ``signing_key``
(a secret: inline, ``signing_key_file`` or ``signing_key_env``), ``tls_ca``
(a CA bundle for a private CA; "" = system store), ``status_topic`` ("" =
off; set: one JSON event per final SMS delivery state is published there,
signed in the event domain with ``signing_key`` when there is one; it must
pass the reply-topic rules of otpd.wire.reply_topics).

Per broker: ``[amqp] url`` (a secret: may carry the password; ``url_file`` /
``url_env`` work), ``heartbeat``. ``[redis] url`` (secret), ``username``,
``password``, ``mode`` (pubsub | stream), ``group``, ``consumer`` (default
``otpd-<hostname>``), ``claim_idle``, ``reply_maxlen``, ``reply_ttl``.
``[mqtt] host``, ``port`` (1883, 8883 with TLS), ``username``, ``password``,
``client_id``, ``protocol`` (3 = 3.1, 4 = 3.1.1, 5), ``tls``, ``keepalive``,
``session_expiry``, ``shared_group`` ("" = off; set, several otpd nodes share
the topic's messages through ``$share/<group>/<topic>``, and ``client_id``
defaults to ``otpd-<hostname>`` so that each node keeps its own session).
``[ws] url``, ``username``, ``password``, ``ping_interval``, ``ping_timeout``,
``reply_min_delay`` (ms).

Permissions (see otpd.grants). Every REST user and every broker consumer holds
the default grants: request-otp, verify-otp, send-sms, send-email (which also
covers send-mail), send-message, block-msisdn, unblock-msisdn and echo. A grant
list changes them: a name adds that grant, ``-name`` takes a default one away;
the other names are request-ussd, get-modem-list and modem-identity (IMSI,
IMEI, ICCID and the port's by-id name in get-modem-list answers). Per REST
user: the ``[server.grants]`` table, ``alice = ["get-modem-list", "-send-sms"]``
(a user not listed holds the defaults). Per broker: ``grants = [...]`` in its
table. USSD codes a caller may run: ``ussd_allow`` in ``[server]`` (every REST
user) or in a broker's table; absent = the built-in balance/information rule
(``*123#``, ``*100*1#``), a list = only codes matching one of its patterns
(``"*888#"``, ``"*100*X#"``, X = one digit), ``[]`` = none. Supplementary
service codes (call forwarding...) are refused whatever the list says.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from urllib.parse import urlsplit

from otpd.grants import (
    DEFAULT_GRANTS,
    GrantError,
    Grants,
    UssdAllowList,
    parse_grant_list,
    parse_ussd_allow,
    rest_grant_key,
)
from otpd.netutil import is_loopback
from otpd.settings_reader import Section
from otpd.wire.brokers import DEFAULT_TOPIC
from otpd.wire.reply_topics import ReplyTopicRules

MAX_TOPIC_CHARS = 255
MIN_SIGNING_KEY_BYTES = 32
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
    # REST user -> its grants when configured in [server.grants]; others: the defaults.
    grants: Mapping[str, Grants] = field(default_factory=lambda: MappingProxyType({}))
    ussd_allow: UssdAllowList = field(default_factory=UssdAllowList)
    # Slow and idle clients (s): the request head (and a TLS handshake) must arrive
    # within header_timeout, its body within body_timeout, the next request within
    # keepalive_timeout of an answer.
    header_timeout: float = 10.0
    body_timeout: float = 20.0
    keepalive_timeout: float = 15.0
    # Open connections in all and per client address (IPv6: per /64). None: derived
    # at start from the descriptor limit (RLIMIT_NOFILE); larger values are lowered there.
    max_connections: int | None = None
    max_connections_per_address: int | None = None

    def grants_for(self, user: str) -> Grants:
        """What ``user`` (authenticated) may run."""
        found = self.grants.get(user)
        if found is not None:
            return found
        return Grants(DEFAULT_GRANTS, self.ussd_allow, rest_grant_key(user))


def _ussd_allow(s: Section) -> UssdAllowList:
    if not s.has("ussd_allow"):
        return UssdAllowList()
    try:
        return parse_ussd_allow(s.str_list("ussd_allow"))
    except GrantError as exc:
        s.error("ussd_allow", str(exc))
        return UssdAllowList(())  # nothing allowed (the error stops the start anyway)


def _grant_names(s: Section, key: str) -> frozenset[str]:
    try:
        return parse_grant_list(s.str_list(key))
    except GrantError as exc:
        s.error(key, str(exc))
        return DEFAULT_GRANTS


def _rest_grants(s: Section, ussd: UssdAllowList) -> Mapping[str, Grants]:
    table = s.section("grants")
    out: dict[str, Grants] = {}
    if table is None:
        return MappingProxyType(out)
    for user in table.data:
        if not user or ":" in user:
            table.error(user, "is not a REST user name (htpasswd names have no ':')")
        out[user] = Grants(_grant_names(table, user), ussd, rest_grant_key(user))
    return MappingProxyType(out)


def parse_server_settings(s: Section) -> ServerSettings:
    host, port = s.host_port("listen", "127.0.0.1:8899")
    paths = tuple(s.str_list("paths", DEFAULT_PATHS))
    for p in paths:
        if not p.startswith("/"):
            s.error("paths", f"{p!r} must start with /")
    cert, key = s.str("tls_cert", ""), s.str("tls_key", "")
    if bool(cert) != bool(key):
        s.error("tls_cert" if not cert else "tls_key", "tls_cert and tls_key must be set together")
    allow_plain = s.bool("allow_plain_http", False)
    ussd = _ussd_allow(s)
    if not cert and not allow_plain and not is_loopback(host):
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
        grants=_rest_grants(s, ussd),
        ussd_allow=ussd,
        header_timeout=s.float("header_timeout", 10.0, min=0.1, max=300.0),
        body_timeout=s.float("body_timeout", 20.0, min=0.1, max=600.0),
        keepalive_timeout=s.float("keepalive_timeout", 15.0, min=0.1, max=600.0),
        max_connections=(s.int("max_connections", 0, min=1, max=1_000_000)
                         if s.has("max_connections") else None),
        max_connections_per_address=(
            s.int("max_connections_per_address", 0, min=1, max=1_000_000)
            if s.has("max_connections_per_address") else None),
    )
    s.finish()
    return out


@dataclass(frozen=True)
class Common:
    topic: str = DEFAULT_TOPIC
    enabled: bool = True
    prefetch: int = 64
    max_message: int = 65536
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    retry_delay: float = 1.0
    reply_wait: float | None = None  # None: the daemon's delivery.wait
    require_signature: bool = False
    signing_key: str = field(default="", repr=False)
    tls_ca: str = ""
    grants: Grants = field(default_factory=Grants)  # what this broker's commands may do
    status_topic: str = ""  # "": no status events; else where delivery events go


@dataclass(frozen=True)
class AmqpSettings:
    common: Common
    url: str = field(default="amqp://guest:guest@127.0.0.1:5672/", repr=False)
    heartbeat: int = 30


@dataclass(frozen=True)
class RedisSettings:
    common: Common
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    username: str = ""  # overrides the URL's user (Redis 6 ACL)
    password: str = field(default="", repr=False)
    mode: str = "pubsub"  # pubsub | stream
    group: str = "otpd"
    consumer: str = ""
    claim_idle: float = 60.0  # s a pending entry must be idle before it is reclaimed
    reply_maxlen: int = 1000  # stream mode: reply streams are trimmed to about this many
    reply_ttl: int = 86400  # stream mode: s before an unread reply stream expires


@dataclass(frozen=True)
class MqttSettings:
    common: Common
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = field(default="", repr=False)
    client_id: str = "otpd"
    protocol: int = 4  # 3 = MQTT 3.1, 4 = MQTT 3.1.1, 5 = MQTT 5
    tls: bool = False
    keepalive: int = 30
    session_expiry: int = 7 * 86400  # MQTT 5: s the broker keeps the session offline
    shared_group: str = ""  # set: subscribe to $share/<group>/<topic> (competing nodes)

    @property
    def subscription(self) -> str:
        """The topic filter to subscribe to."""
        topic = self.common.topic
        return f"$share/{self.shared_group}/{topic}" if self.shared_group else topic


@dataclass(frozen=True)
class WsSettings:
    common: Common
    url: str = "ws://127.0.0.1:9000/ws"
    username: str = ""
    password: str = field(default="", repr=False)
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    # ms a reply waits at least: the broker keeps nothing, and OTP-Publisher opens
    # its reply connection (with a password check) only after publishing.
    reply_min_delay: int = 250


@dataclass(frozen=True)
class BrokerSettings:
    amqp: AmqpSettings | None = None
    redis: RedisSettings | None = None
    mqtt: MqttSettings | None = None
    ws: WsSettings | None = None


def parse_broker_settings(
    root_amqp: Section | None,
    root_redis: Section | None,
    root_mqtt: Section | None,
    root_ws: Section | None,
) -> BrokerSettings:
    """Errors go to the sections' shared error list (the caller raises)."""
    out = BrokerSettings(
        amqp=_amqp(root_amqp) if root_amqp is not None else None,
        redis=_redis(root_redis) if root_redis is not None else None,
        mqtt=_mqtt(root_mqtt) if root_mqtt is not None else None,
        ws=_ws(root_ws) if root_ws is not None else None,
    )
    # A status topic that is another table's command topic would be read back
    # as commands there (each table checked its own already).
    tables = {"amqp": (root_amqp, out.amqp), "redis": (root_redis, out.redis),
              "mqtt": (root_mqtt, out.mqtt), "ws": (root_ws, out.ws)}
    commands = {t.common.topic for _, t in tables.values() if t is not None}
    for section, table in tables.values():
        if section is not None and table is not None and table.common.status_topic in commands:
            section.error("status_topic", "is a command topic")
    return out


def _common(s: Section) -> Common:
    topic = s.str("topic", DEFAULT_TOPIC)
    if not topic.strip() or len(topic) > MAX_TOPIC_CHARS or not topic.isprintable():
        s.error("topic", f"must be 1..{MAX_TOPIC_CHARS} printable characters")
        topic = DEFAULT_TOPIC
    rmin = s.float("reconnect_min", 1.0, min=0.01, max=3600.0)
    rmax = s.float("reconnect_max", 60.0, min=0.01, max=3600.0)
    if rmax < rmin:
        s.error("reconnect_max", "must be >= reconnect_min")
    reply_wait = s.float("reply_wait", 0.0, min=0.0, max=300.0) if s.has("reply_wait") else None
    require = s.bool("require_signature", False)
    key = s.secret("signing_key")
    if require and not key:
        s.error("signing_key", "is required when require_signature = true")
    elif key and len(key.encode("utf-8")) < MIN_SIGNING_KEY_BYTES:
        # HMAC is only as strong as its key: a short one can be guessed offline
        # from a single captured command.
        s.error("signing_key", f"must be at least {MIN_SIGNING_KEY_BYTES} bytes (random; e.g."
                               " `openssl rand -hex 32`)")
    tls_ca = s.str("tls_ca", "")
    grants = Grants(_grant_names(s, "grants"), _ussd_allow(s), s.key("grants"))
    status_topic = s.str("status_topic", "")
    if status_topic:
        # Written to like a callback topic: the same rules (the other brokers' command
        # topics and the store's key prefix are checked when the daemon starts).
        why = ReplyTopicRules.build([topic], []).refusal(status_topic)
        if why is not None:
            s.error("status_topic", why)
            status_topic = ""
    return Common(
        topic=topic,
        enabled=s.bool("enabled", True),
        prefetch=s.int("prefetch", 64, min=1, max=1000),
        max_message=s.int("max_message", 65536, min=1024, max=16 * 1024 * 1024),
        reconnect_min=rmin,
        reconnect_max=max(rmin, rmax),
        retry_delay=s.float("retry_delay", 1.0, min=0.0, max=600.0),
        reply_wait=reply_wait,
        require_signature=require,
        signing_key=key,
        tls_ca=tls_ca,
        grants=grants,
        status_topic=status_topic,
    )


def _check_url(s: Section, key: str, url: str, schemes: tuple[str, ...]) -> bool:
    parts = urlsplit(url)
    if parts.scheme not in schemes:
        s.error(key, "must start with " + " or ".join(f"{x}://" for x in schemes))
        return False
    if parts.scheme != "unix" and not parts.hostname:
        s.error(key, "must name a host")
        return False
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        s.error(key, "has an invalid port")
        return False
    return True


def _amqp(s: Section) -> AmqpSettings:
    common = _common(s)
    default = AmqpSettings(common)
    # A secret: the URL usually carries the password (url_file / url_env work too).
    url = s.secret("url", default.url)
    if not _check_url(s, "url", url, ("amqp", "amqps")):
        url = default.url
    out = AmqpSettings(common, url=url, heartbeat=s.int("heartbeat", 30, min=0, max=3600))
    s.finish()
    return out


def _redis(s: Section) -> RedisSettings:
    common = _common(s)
    default = RedisSettings(common)
    url = s.secret("url", default.url)
    if not _check_url(s, "url", url, ("redis", "rediss", "unix")):
        url = default.url
    mode = s.str("mode", "pubsub", choices=("pubsub", "stream"))
    group = s.str("group", "otpd")
    if not group.strip():
        s.error("group", "must not be empty")
        group = "otpd"
    consumer = s.str("consumer", "") or f"otpd-{socket.gethostname()}"
    out = RedisSettings(
        common,
        url=url,
        username=s.str("username", ""),
        password=s.secret("password"),
        mode=mode,
        group=group,
        consumer=consumer,
        claim_idle=s.float("claim_idle", 60.0, min=0.1, max=86400.0),
        reply_maxlen=s.int("reply_maxlen", 1000, min=1, max=1_000_000),
        reply_ttl=s.int("reply_ttl", 86400, min=1, max=30 * 86400),
    )
    s.finish()
    return out


def _mqtt(s: Section) -> MqttSettings:
    common = _common(s)
    tls = s.bool("tls", False) or bool(common.tls_ca)
    shared_group = s.str("shared_group", "")
    if shared_group and (any(c in shared_group for c in "/+#")
                         or not shared_group.isprintable()
                         or len(shared_group) > MAX_TOPIC_CHARS):
        s.error("shared_group", f"must be 1..{MAX_TOPIC_CHARS} printable characters"
                                " without '/', '+' or '#' (or \"\" for none)")
        shared_group = ""
    # Nodes sharing a group each need their own session: one client id per host.
    client_id = s.str("client_id", f"otpd-{socket.gethostname()}" if shared_group else "otpd")
    if not client_id or len(client_id.encode()) > 65535:
        s.error("client_id", "must not be empty (a fixed id keeps the session while offline)")
        client_id = "otpd"
    protocol = s.int("protocol", 4, min=3, max=5)
    host = s.str("host", "127.0.0.1")
    if not host.strip():
        s.error("host", "must not be empty")
        host = "127.0.0.1"
    out = MqttSettings(
        common,
        host=host,
        port=s.int("port", 8883 if tls else 1883, min=1, max=65535),
        username=s.str("username", ""),
        password=s.secret("password"),
        client_id=client_id,
        protocol=protocol,
        tls=tls,
        keepalive=s.int("keepalive", 30, min=5, max=3600),
        session_expiry=s.int("session_expiry", 7 * 86400, min=0, max=2**32 - 1),
        shared_group=shared_group,
    )
    s.finish()
    return out


def _ws(s: Section) -> WsSettings:
    common = _common(s)
    default = WsSettings(common)
    url = s.str("url", default.url)
    if not _check_url(s, "url", url, ("ws", "wss")):
        url = default.url
    out = WsSettings(
        common,
        url=url,
        username=s.str("username", ""),
        password=s.secret("password"),
        ping_interval=s.float("ping_interval", 20.0, min=1.0, max=3600.0),
        ping_timeout=s.float("ping_timeout", 20.0, min=1.0, max=3600.0),
        reply_min_delay=s.int("reply_min_delay", 250, min=0, max=10_000),
    )
    s.finish()
    return out
