"""The WebSocket message broker (OTP-Publisher's WSMessageBroker, done right).

Wire behaviour, compatible with the PHP (Ratchet) and Java brokers' clients:

* ``GET <path>?topic=<topic>`` (path default ``/ws``, with or without a
  trailing slash) with HTTP Basic auth checked against an htpasswd file
  *before* the upgrade: a missing or wrong login gets ``401`` with
  ``WWW-Authenticate: Basic realm="otpd-broker"``, a missing topic ``400``,
  another path ``404``. No connection is ever opened unauthenticated.
* ``Authorization: Basic user:pass`` sent raw (not base64), as the PHP
  OTP-Publisher client does, is accepted too. That client sends the user name
  as the password, so its user's htpasswd password must equal the user name.
* A text frame is relayed to every other client on the same topic whose user
  may subscribe there; never back to the sender, never to another topic.
* Binary frames are refused: the connection is closed with 1003 (unsupported
  data). Every OTP command is UTF-8 JSON, and otpd's consumer reads text only.
* Messages over ``max_message`` bytes close the connection with 1009.
* A client that closes TCP right after its frame, without a close frame (the
  PHP client), is normal: its message is still relayed.
* Each client has a bounded outbox (``queue_bytes``, default 1 MiB). A client
  further behind than that, or whose socket does not drain for
  ``send_timeout``, is cut off (TCP abort, seen as 1006) so that it never slows
  the others. Dead peers are found by ping/pong (every 20 s, 20 s timeout).

Topic permissions (:mod:`otpd.broker.acl`, file ``settings.acl_path``):

* After authentication the user needs publish or subscribe permission on the
  topic, else ``403``. A user no rule names is refused the same way, and a
  missing ACL file means nobody gets in (both logged).
* A connection without subscribe permission never receives a frame of its
  topic. A frame from a connection without publish permission is not relayed:
  it is logged and the connection is closed with 1008 (policy violation), so a
  misbehaving client learns of it and cannot fill the log one line per frame.
* :meth:`BrokerServer.reload` (SIGHUP) re-reads the ACL and users files. A bad
  file keeps the rules in force (logged with its line). Open connections are
  re-checked: one whose user was removed or lost both rights is closed with
  1008; otherwise its rights change in place.
"""

from __future__ import annotations

import asyncio
import http
import logging
import math
import ssl
import weakref
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from otpd.auth.basic import parse_basic_auth
from otpd.auth.htpasswd import HtpasswdError, HtpasswdFile
from otpd.auth.login_gate import LoginGate, Ticket
from otpd.broker import acl as acl_file
from otpd.broker.acl import Access, Acl, AclError
from otpd.broker.admission import Admission, capped_connection, connection_limits
from otpd.broker.hub import Hub, Subscriber
from otpd.connection_caps import ConnectionCaps
from otpd.netutil import is_loopback

log = logging.getLogger("otpd.broker")
# websockets' own logger. Its DEBUG output quotes frame payloads (OTP codes) and
# its INFO lines repeat ours, so it is pinned to WARNING whatever the root says.
_wire_log = logging.getLogger("otpd.broker.websockets")
_wire_log.setLevel(logging.WARNING)

REALM = "otpd-broker"
MAX_TOPIC_LENGTH = 255
ACL_FILE_NAME = "broker.acl"


@dataclass(frozen=True, slots=True)
class BrokerSettings:
    """Broker settings; defaults match the CLI's."""

    htpasswd: Path
    # Topic permissions; None: ``broker.acl`` next to the htpasswd file.
    acl: Path | None = None
    host: str = "127.0.0.1"
    port: int = 9000
    path: str = "/ws"
    max_message: int = 64 * 1024
    # Per-client outbox; a client more than this far behind is disconnected.
    queue_bytes: int = 1024 * 1024
    # A single send stuck this long (peer not reading, TCP window full) drops it.
    send_timeout: float = 10.0
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    # How long a closing handshake may take before TCP is cut.
    close_timeout: float = 5.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # Plain ws:// off loopback: only behind a proxy that terminates TLS.
    allow_plain: bool = False
    # Failed logins per address (IPv6: per /64) within login_window s before 429.
    login_failures_max: int = 10
    login_window: float = 900.0
    # Open connections in all and per client address (IPv6: per /64), counted before
    # the HTTP upgrade. None: derived at start from the descriptor limit
    # (RLIMIT_NOFILE), like the REST listener's; larger values are lowered there.
    max_connections: int | None = None
    max_connections_per_address: int | None = None

    @property
    def acl_path(self) -> Path:
        """The ACL file in force."""
        return self.acl if self.acl is not None else self.htpasswd.parent / ACL_FILE_NAME

    def validate(self) -> list[str]:
        errors = []
        if not self.path.startswith("/"):
            errors.append("path must start with '/'")
        if not 1 <= self.max_message <= 16 * 1024 * 1024:
            errors.append("max_message must be 1..16777216 bytes")
        if self.queue_bytes < self.max_message:
            errors.append("queue_bytes must be at least max_message")
        if (self.tls_cert is None) != (self.tls_key is None):
            errors.append("tls_cert and tls_key must be given together")
        if self.max_connections is not None and self.max_connections < 1:
            errors.append("max_connections must be at least 1")
        if self.max_connections_per_address is not None and self.max_connections_per_address < 1:
            errors.append("max_connections_per_address must be at least 1")
        if (self.max_connections is not None and self.max_connections_per_address is not None
                and self.max_connections_per_address > self.max_connections):
            errors.append("max_connections_per_address must not exceed max_connections")
        if not 0 <= self.port <= 65535:
            errors.append("port must be 0..65535")
        if self.tls_cert is None and not self.allow_plain and not is_loopback(self.host):
            errors.append(f"listen: {self.host} is not a loopback address: passwords and OTP"
                          " texts would cross the network in clear; give --tls-cert and"
                          " --tls-key, or --allow-plain-http (only behind a TLS-terminating"
                          " proxy)")
        return errors


# The old name, still used by callers and tests.
BrokerConfig = BrokerSettings


@dataclass(frozen=True, slots=True)
class _Login:
    user: str
    topic: str


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        return f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}"
    return str(address)


def _host(ws: ServerConnection) -> str:
    address = ws.remote_address
    return str(address[0]) if isinstance(address, tuple) and address else str(address)


class _Throttled(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"retry after {retry_after:g} s")
        self.retry_after = retry_after


def _valid_topic(topic: str) -> bool:
    return 0 < len(topic) <= MAX_TOPIC_LENGTH and topic.isprintable()


class BrokerServer:
    """Start with :meth:`start`, stop with :meth:`stop` (or ``async with``).

    ``users`` and ``acl`` replace the first reading of the htpasswd and ACL
    files; :meth:`reload` always reads the files.
    """

    def __init__(
        self,
        config: BrokerSettings,
        users: HtpasswdFile | None = None,
        acl: Acl | None = None,
    ) -> None:
        errors = config.validate()
        if errors:
            raise ValueError("; ".join(errors))
        self.config = config
        self._users = users
        self._acl = acl
        self._gate = LoginGate(max_failures=config.login_failures_max,
                               window=config.login_window)
        # Close handshakes started by a reload; held so they are not collected.
        self._closing: set[asyncio.Task[None]] = set()
        self._hub = Hub()
        self._server: Server | None = None
        self.admission: Admission | None = None  # the connection caps, while running
        self._loop_handler_set = False
        self._path = config.path.rstrip("/")
        # Filled by the handshake hook, read by the handler. Weak, so that a
        # handshake that fails after authentication leaves nothing behind.
        self._logins: weakref.WeakKeyDictionary[ServerConnection, _Login] = (
            weakref.WeakKeyDictionary()
        )

    # -- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        """Load the users and ACL files, bind and start accepting connections.

        Raises HtpasswdError, AclError, OSError (bind, TLS files) or ssl.SSLError.
        A missing ACL file is not an error: nobody gets in (logged).
        """
        if self._users is None:
            self._users = HtpasswdFile.load(self.config.htpasswd)
        for user in self._users.weak_entries:
            log.warning("user %r has a plaintext or unsupported hash and cannot log in", user)
        if self._acl is None:
            self._acl = self._read_acl()
        self._log_acl_coverage()
        cfg = self.config
        limits = connection_limits(cfg.max_connections, cfg.max_connections_per_address)
        for note in limits.notes:
            log.warning("broker: %s", note)
        log.info("broker connections: at most %d, %d per client address", limits.total,
                 limits.per_address)
        admission = Admission(ConnectionCaps(limits.total, limits.per_address))
        loop = asyncio.get_running_loop()
        # asyncio logs a failing accept() once a second with a traceback: throttled,
        # unless the program installed its own handler.
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(admission.exception_handler)
            self._loop_handler_set = True
        self.admission = admission
        try:
            self._server = await self._serve(admission)
        except BaseException:
            self._restore_loop_handler()
            self.admission = None
            raise
        scheme = "wss" if cfg.tls_cert else "ws"
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        log.info("broker listening on %s://%s:%d%s", scheme, host, self.port, cfg.path)

    async def _serve(self, admission: Admission) -> Server:
        cfg = self.config
        return await serve(
            self._handle,
            cfg.host,
            cfg.port,
            # Over a cap, a connection is reset before the HTTP upgrade.
            create_connection=capped_connection(admission),
            process_request=self._process_request,
            ssl=self._ssl_context(),
            max_size=cfg.max_message,
            # Commands are a few hundred bytes; per-receiver deflate would cost
            # CPU and a zlib context per client on a Pi for nothing.
            compression=None,
            ping_interval=cfg.ping_interval,
            ping_timeout=cfg.ping_timeout,
            close_timeout=cfg.close_timeout,
            server_header=None,
            logger=_wire_log,
        )

    def _restore_loop_handler(self) -> None:
        if self._loop_handler_set:
            self._loop_handler_set = False
            asyncio.get_running_loop().set_exception_handler(None)

    async def stop(self) -> None:
        """Close every connection (1001 going away) and stop listening."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        try:
            # Closing handshakes wait for the peer; one that does not read
            # would keep that wait open, so it is bounded.
            async with asyncio.timeout(self.config.close_timeout + 1.0):
                await server.wait_closed()
        except TimeoutError:
            self._hub.abort_all()
            await server.wait_closed()
        if self.admission is not None:
            self.admission.close()
        self._restore_loop_handler()
        log.info("broker stopped")

    # -- permissions -------------------------------------------------------------
    def _read_acl(self) -> Acl:
        """The ACL file's rules; empty (nobody gets in) if there is no file.
        Raises AclError."""
        path = self.config.acl_path
        try:
            rules = acl_file.load(path)
        except FileNotFoundError:
            log.error(
                "ACL file %s does not exist: nobody may publish or subscribe; "
                "write it (see broker.acl.example) and reload (SIGHUP)",
                path,
            )
            return Acl()
        log.info("topic permissions from %s: %d grants for %d users", path, len(rules),
                 len(rules.users))
        return rules

    def _log_acl_coverage(self) -> None:
        assert self._users is not None and self._acl is not None
        for user in self._users.users:
            if not self._acl.has_rule(user):
                log.warning("user %r has no rule in the ACL file %s and cannot connect",
                            user, self.config.acl_path)

    def reload(self) -> None:
        """Re-read the users and ACL files (SIGHUP) and re-check open connections.

        A file that cannot be used is logged and the previous one stays in force.
        """
        log.info("reloading %s and %s", self.config.htpasswd, self.config.acl_path)
        if self._users is not None:
            try:
                if self._users.reload():
                    log.info("reloaded users file %s (%d users)", self.config.htpasswd,
                             len(self._users.users))
            except HtpasswdError as exc:
                log.error("keeping the previous users; cannot reload: %s", exc)
        try:
            self._acl = self._read_acl()
        except AclError as exc:
            for problem in exc.problems:  # one journal line each, all with the path
                log.error("keeping the previous topic permissions; cannot reload %s: %s",
                          exc.source, problem)
        if self._users is not None and self._acl is not None:
            self._log_acl_coverage()
            # Users removed, or whose entry can no longer log in, are cut off.
            self._recheck(set(self._users.users) - set(self._users.weak_entries))

    def _recheck(self, users: set[str]) -> None:
        assert self._acl is not None
        for sub in self._hub.subscribers():
            access = self._acl.access(sub.user, sub.topic)
            if sub.user not in users:
                reason = "user removed"
            elif not access:
                reason = "no permission on this topic"
            else:
                if access != sub.access:
                    log.info("access changed user=%r topic=%r peer=%s: %s -> %s",
                             sub.user, sub.topic, sub.peer, sub.access, access)
                    sub.access = access
                continue
            log.warning("closing user=%r topic=%r peer=%s after reload: %s",
                        sub.user, sub.topic, sub.peer, reason)
            sub.access = Access()
            self._close_later(sub.ws, reason)

    def _close_later(self, ws: ServerConnection, reason: str) -> None:
        task = asyncio.create_task(ws.close(CloseCode.POLICY_VIOLATION, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def __aenter__(self) -> BrokerServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _ssl_context(self) -> ssl.SSLContext | None:
        if self.config.tls_cert is None or self.config.tls_key is None:
            return None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return ctx

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self._server is None:
            raise RuntimeError("broker is not running")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def clients(self) -> int:
        """Authenticated clients currently connected."""
        return len(self._hub)

    # -- handshake -------------------------------------------------------------
    def _reject(self, ws: ServerConnection, status: http.HTTPStatus, text: str) -> Response:
        response = ws.respond(status, text + "\n")
        if status == http.HTTPStatus.UNAUTHORIZED:
            response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}"'
        return response

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        try:
            return await self._check_request(ws, request)
        except _Throttled as exc:
            response = self._reject(ws, http.HTTPStatus.TOO_MANY_REQUESTS, "Too Many Requests")
            response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
            return response

    async def _check_request(self, ws: ServerConnection, request: Request) -> Response | None:
        # Cheap checks before the expensive password check.
        url = urlsplit(request.path)
        if url.path.rstrip("/") != self._path:
            return self._reject(ws, http.HTTPStatus.NOT_FOUND, "Not Found")
        topics = parse_qs(url.query, keep_blank_values=True).get("topic", [])
        if len(topics) != 1 or not _valid_topic(topics[0]):
            return self._reject(ws, http.HTTPStatus.BAD_REQUEST, "Bad Request: need one ?topic=")
        credentials = _credentials(request.headers)
        if credentials is None:
            return self._reject(ws, http.HTTPStatus.UNAUTHORIZED, "Unauthorized")
        if not await self._login(ws, *credentials):
            return self._reject(ws, http.HTTPStatus.UNAUTHORIZED, "Unauthorized")
        user, topic = credentials[0], topics[0]
        assert self._acl is not None
        if not self._acl.has_rule(user):
            log.warning("refused user=%r topic=%r peer=%s: the user has no rule in the ACL file %s",
                        user, topic, _peer(ws), self.config.acl_path)
            return self._reject(ws, http.HTTPStatus.FORBIDDEN, "Forbidden")
        if not self._acl.access(user, topic):
            log.warning("refused user=%r topic=%r peer=%s: "
                        "no publish or subscribe permission on this topic",
                        user, topic, _peer(ws))
            return self._reject(ws, http.HTTPStatus.FORBIDDEN, "Forbidden")
        self._logins[ws] = _Login(user, topic)
        return None

    async def _login(self, ws: ServerConnection, user: str, password: str) -> bool:
        """The password check, through the login gate: counted before bcrypt runs,
        one check at a time per address (group), a growing delay after a failure.
        Raises :class:`_Throttled` when the address may not try now."""
        assert self._users is not None
        got = await self._gate.reserve(_host(ws))
        if not isinstance(got, Ticket):
            raise _Throttled(got)
        ok = False
        try:
            ok = await self._users.verify_async(user, password)
        finally:
            delay = got.release(ok, user)  # logs the failure (address, user)
        if not ok and delay > 0:
            await asyncio.sleep(delay)
        return ok

    # -- connection ------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        login = self._logins.pop(ws, None)
        if login is None:  # cannot happen: the handshake hook accepted it
            await ws.close(CloseCode.INTERNAL_ERROR)
            return
        # Asked again, without an await before hub.add: a reload may have
        # happened since the handshake hook.
        assert self._acl is not None
        access = self._acl.access(login.user, login.topic)
        if not access:
            await ws.close(CloseCode.POLICY_VIOLATION, "no permission on this topic")
            return
        cfg = self.config
        sub = Subscriber(
            ws,
            user=login.user,
            topic=login.topic,
            peer=_peer(ws),
            queue_bytes=cfg.queue_bytes,
            send_timeout=cfg.send_timeout,
            access=access,
        )
        self._hub.add(sub)
        writer = asyncio.create_task(sub.run_writer(), name=f"broker-writer-{sub.peer}")
        log.info("connect user=%r topic=%r peer=%s access=%s", sub.user, sub.topic, sub.peer,
                 access)
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    await ws.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
                    break
                if not sub.access.publish:
                    log.warning("refused a frame from user=%r topic=%r peer=%s: no publish "
                                "permission on this topic; closing (1008)",
                                sub.user, sub.topic, sub.peer)
                    await ws.close(CloseCode.POLICY_VIOLATION, "no publish permission")
                    break
                self._hub.publish(sub, message.encode("utf-8"))
        except ConnectionClosed:
            pass  # abrupt TCP close, oversize frame, ping timeout, dropped: all normal
        finally:
            self._hub.remove(sub)
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            code = ws.close_code if ws.close_code is not None else 1006
            log.info(
                "disconnect user=%r topic=%r peer=%s code=%d%s",
                sub.user,
                sub.topic,
                sub.peer,
                code,
                f" ({sub.drop_reason})" if sub.drop_reason else "",
            )


def _credentials(headers: Headers) -> tuple[str, str] | None:
    values = headers.get_all("Authorization")
    if len(values) != 1:
        return None
    return parse_basic_auth(values[0])
