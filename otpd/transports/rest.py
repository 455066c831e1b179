"""REST transport (aiohttp): HTTP Basic auth, JSON in, JSON out.

Compatible with OTP-Publisher's PHP client: the body is JSON whatever the
Content-Type says, every answer (401 included) is a JSON object with
``command``, ``response_code`` and ``data``, and the JSON ``command`` decides
what happens, not the path.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import resource
import ssl
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol

from aiohttp import HttpVersion11, hdrs, web
from prometheus_client.exposition import choose_encoder

from otpd.auth.basic import parse_basic_auth
from otpd.auth.htpasswd import HtpasswdFile
from otpd.auth.login_gate import Ticket
from otpd.errors import StartupError
from otpd.grants import STATUS_PAGE, grant_for
from otpd.metrics import Metrics
from otpd.msisdn import InvalidReceiver
from otpd.service import Service
from otpd.transports import csrf
from otpd.transports.rest_guard import ConnectionCaps, Timeouts, connection_limits
from otpd.transports.rest_listener import (
    EXPECT_CONTINUE,
    SERVER_NAME,
    Guard,
    GuardedListener,
    request_factory,
)
from otpd.transports.settings import ServerSettings
from otpd.transports.status_page import (
    NOTICES,
    SECURITY_HEADERS,
    STATUS_PATH,
    Viewer,
    render_page,
    render_refusal,
)
from otpd.wire.codes import Code
from otpd.wire.protocol import (
    COMMAND_NAMES,
    ProtocolError,
    Response,
    error_response,
    parse_request,
)

log = logging.getLogger("otpd.rest")

_REALM = 'Basic realm="otpd", charset="UTF-8"'
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """``Expect`` header: ``100 Continue`` is sent on the first read of the body (see
    ``ContinueRequest``), which comes after authentication, not here before it as
    aiohttp's default would."""
    if request.version != HttpVersion11:
        return None
    if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
        return _error(Code.INVALID_REQUEST, "unsupported Expect header", 417)
    request[EXPECT_CONTINUE] = True
    return None


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[hdrs.SERVER] = SERVER_NAME  # not aiohttp's, with its version


def json_response(body: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def _error(code: Code, message: str, status: int, command: str = "",
           headers: dict[str, str] | None = None) -> web.Response:
    return json_response(Response(command or "unknown", code, {}, message).to_json(), status,
                         headers)


class Health(Protocol):
    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Readiness and its details (store writable, a channel usable...)."""
        ...


class StatusBoard(Protocol):
    async def snapshot(self) -> dict[str, Any]:
        """What the status page shows (see ``otpd.transports.status_page``)."""
        ...


def _page(body: str, status: int = 200) -> web.Response:
    """An HTML answer of the status page, with its security headers."""
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8",
                        headers=SECURITY_HEADERS)


class RestApi:
    def __init__(self, settings: ServerSettings, service: Service, users: HtpasswdFile | None,
                 wait: float, *, metrics: Metrics | None = None, health: Health | None = None,
                 metrics_auth: bool = True, status_board: StatusBoard | None = None) -> None:
        self.settings = settings
        self.service = service
        self.users = users
        self.wait = wait
        self.metrics = metrics
        self.health = health
        self.metrics_auth = metrics_auth
        self.status_board = status_board
        # Domain-separated from the server key: the page's CSRF tokens.
        self._csrf_key = csrf.derive_key(service.key)
        self._runner: web.AppRunner | None = None
        self._ssl: ssl.SSLContext | None = None
        self._listener: GuardedListener | None = None
        self.guard: Guard | None = None
        self.port: int | None = None

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.settings.max_body,
            middlewares=[self._errors_as_json],
        )
        for path in self.settings.paths:
            app.router.add_route("*", path, self._handle, expect_handler=_expect)
        app.router.add_get("/api/openapi.yaml", self._openapi, expect_handler=_expect)
        app.router.add_get("/healthz", self._healthz, expect_handler=_expect)
        app.router.add_get("/readyz", self._readyz, expect_handler=_expect)
        if self.metrics is not None:
            app.router.add_get("/metrics", self._metrics, expect_handler=_expect)
        if self.status_board is not None:
            app.router.add_get(STATUS_PATH, self._status_page, expect_handler=_expect)
            app.router.add_post(STATUS_PATH, self._status_post, expect_handler=_expect)
        app.on_response_prepare.append(_server_header)
        return app

    def reload_tls(self) -> None:
        """Load a renewed certificate: new connections get it, open ones keep theirs."""
        if self._ssl is not None:
            self._ssl.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
            log.info("reloaded TLS certificate %s", self.settings.tls_cert)

    async def _openapi(self, request: web.Request) -> web.Response:
        document = resources.files("otpd.transports").joinpath("openapi.yaml")
        text = document.read_text(encoding="utf-8")
        return web.Response(text=text, content_type="application/yaml")

    async def _healthz(self, request: web.Request) -> web.Response:
        # Liveness: the event loop answers. Readiness is /readyz.
        return json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.health is None:
            return json_response({"ready": True})
        ready, details = await self.health.ready()
        return json_response({"ready": ready, **details}, 200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        assert self.metrics is not None
        if self.metrics_auth and isinstance(refused := await self._login(request), web.Response):
            return refused
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    # -- the status page (rendering: otpd.transports.status_page) ----------------
    async def _page_login(self, request: web.Request) -> tuple[str, Viewer] | web.Response:
        """The user and what the page lets them do, or the 401/429/403 answer.
        The same Basic auth and login gate as the API; viewing needs ``status-page``."""
        user = await self._login(request)
        if isinstance(user, web.Response):
            user.headers.update(SECURITY_HEADERS)
            return user
        grants = self.settings.grants_for(user)
        if not grants.allows(STATUS_PAGE):
            return _page(render_refusal(
                "Forbidden", f"{user} may not view the status page: grant {STATUS_PAGE!r} in"
                f" {grants.setting or 'server.grants'}"), 403)
        viewer = Viewer(user, csrf.make_token(self._csrf_key, user, self.service.clock()),
                        can_block=grants.allows("block-msisdn"),
                        can_unblock=grants.allows("unblock-msisdn"),
                        refresh=request.query.get("refresh") != "off")
        return user, viewer

    async def _status_page(self, request: web.Request) -> web.Response:
        assert self.status_board is not None
        found = await self._page_login(request)
        if isinstance(found, web.Response):
            return found
        _, viewer = found
        notice = NOTICES.get(request.query.get("done", ""), "")
        return _page(render_page(await self.status_board.snapshot(), viewer, notice=notice))

    async def _status_post(self, request: web.Request) -> web.Response:
        """Block or unblock from the page: same origin, a valid CSRF token, the grant."""
        found = await self._page_login(request)
        if isinstance(found, web.Response):
            return found
        user, viewer = found
        tls = self._ssl is not None
        if not csrf.same_origin(request.headers.get(hdrs.ORIGIN),
                                request.headers.get(hdrs.REFERER), request.host, tls):
            log.warning("status page: refused a POST by %s from another origin (%s)", user,
                        request.headers.get(hdrs.ORIGIN, "no Origin header"))
            return _page(render_refusal("Forbidden", "cross-origin request refused"), 403)
        if request.content_type != "application/x-www-form-urlencoded":
            return _page(render_refusal("Bad request", "expected a form"), 400)
        form = await request.post()
        token, action, receiver = (form.get("csrf"), form.get("op"), form.get("receiver"))
        if not isinstance(token, str) or not csrf.token_valid(
                self._csrf_key, user, token, self.service.clock()):
            log.warning("status page: refused a POST by %s without a valid CSRF token", user)
            return _page(render_refusal("Forbidden", "missing or expired form token: reload"
                                        " the status page and try again"), 403)
        if action not in ("block", "unblock") or not isinstance(receiver, str):
            return _page(render_refusal("Bad request", "unknown action"), 400)
        if not (viewer.can_block if action == "block" else viewer.can_unblock):
            grant = grant_for(f"{action}-msisdn")
            return _page(render_refusal("Forbidden", f"{user} may not {action}: grant"
                                        f" {grant!r} in [server.grants]"), 403)
        by = f"rest:{user} (status page)"
        try:
            if action == "block":
                await self.service.block(receiver, by=by)
                done = "blocked"
            else:
                _, removed = await self.service.unblock(receiver, by=by)
                done = "unblocked" if removed else "not-blocked"
        except InvalidReceiver as exc:
            assert self.status_board is not None
            return _page(render_page(await self.status_board.snapshot(), viewer,
                                     error=f"{action}: {exc}"), 400)
        # Post/redirect/get: a reload never posts again.
        return web.Response(status=303, headers={**SECURITY_HEADERS,
                                                 "Location": f"{STATUS_PATH}?done={done}"})

    async def start(self) -> None:
        # In-flight requests get 2 s to finish on stop (waiting ones were already
        # answered 1111 by release_waiters), not aiohttp's default minute.
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                               shutdown_timeout=2.0)
        await runner.setup()
        ssl_ctx = None
        try:
            if self.settings.tls_cert:
                ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                ssl_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                ssl_ctx.load_cert_chain(self.settings.tls_cert, self.settings.tls_key)
                self._ssl = ssl_ctx
        except (OSError, ssl.SSLError) as exc:
            await runner.cleanup()
            raise StartupError(f"server.tls_cert/tls_key: cannot load: {exc}") from exc
        s = self.settings
        server = runner.server
        assert server is not None
        server.request_factory = request_factory(s.max_body)
        guard = self._guard()
        # Our own listener, not web.TCPSite: it refuses connections over the caps
        # before TLS or HTTP and closes slow or idle ones (see rest_listener).
        listener = GuardedListener(server, guard, ssl_context=ssl_ctx, handler_args={
            "keepalive_timeout": s.keepalive_timeout,
            "access_log": None,
            # A body left unread (answered 401 before it came) is drained this long at most.
            "lingering_time": min(2.0, s.body_timeout),
        })
        try:
            await listener.start(s.host, s.port)
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(
                f"server.listen: cannot listen on {s.host}:{s.port}: {exc.strerror or exc}"
            ) from exc
        self._runner, self._listener, self.guard = runner, listener, guard
        sockets = listener.sockets
        self.port = sockets[0].getsockname()[1] if sockets else s.port
        log.info("REST API listening on %s://%s:%s", "https" if ssl_ctx else "http",
                 s.host, self.port)

    def _guard(self) -> Guard:
        """Caps and timeouts; the caps kept below the descriptor limit (logged)."""
        s = self.settings
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        nofile = soft if soft != resource.RLIM_INFINITY else 1 << 20
        limits = connection_limits(nofile, s.max_connections, s.max_connections_per_address)
        for note in limits.notes:
            log.warning("server: %s", note)
        log.info("REST connections: at most %d, %d per client address (descriptor limit %d);"
                 " timeouts: header %gs, body %gs, keep-alive %gs", limits.total,
                 limits.per_address, nofile, s.header_timeout, s.body_timeout,
                 s.keepalive_timeout)
        return Guard(ConnectionCaps(limits.total, limits.per_address),
                     Timeouts(s.header_timeout, s.body_timeout, s.keepalive_timeout))

    async def stop(self) -> None:
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _errors_as_json(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own errors (404, 405, 413...) as JSON bodies like every other answer."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = Code.INVALID_REQUEST
            if exc.status == 413:
                message = f"request body larger than {self.settings.max_body} bytes"
            else:
                message = exc.reason
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return _error(code, message, exc.status, headers=headers)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            # A bug: logged with its traceback (never the request body), and the
            # client still gets a JSON answer it can read.
            log.exception("internal error on %s %s", request.method, request.path)
            return _error(Code.FAILED, "internal error; nothing was done", 500)

    async def _login(self, request: web.Request) -> str | web.Response:
        """The authenticated user, or the 401/429 answer.

        Credential stuffing: before the password check, the address group's window
        in the store (shared by the nodes) and the service's login gate (this node:
        the check counts as a failure until it ends; checks in flight capped per
        address group, served fairly) must allow it; a failure is counted in both
        and answered after a delay that grows with the group's failures."""
        unauthorized = _error(Code.UNAUTHORIZED, "unauthorized", 401,
                              headers={"WWW-Authenticate": _REALM})
        creds = parse_basic_auth(request.headers.get("Authorization", ""), raw_form=False,
                                 latin1=True)
        if creds is None or self.users is None:
            return unauthorized  # no password to check: nothing to reserve or count
        ip = request.remote or "-"
        retry_after = await self.service.login_blocked(ip)
        reserved: Ticket | float = retry_after
        if retry_after <= 0:
            reserved = await self.service.login_gate.reserve(ip)
        if not isinstance(reserved, Ticket):
            seconds = str(max(1, math.ceil(reserved)))
            return _error(Code.RATE_LIMITED, "too many failed logins from this address", 429,
                          headers={"Retry-After": seconds})
        user, password = creds
        ok = False
        try:
            ok = await self.users.verify_async(user, password)
        finally:
            delay = reserved.release(ok, user)  # also when the check failed or was cancelled
        if ok:
            return user
        if await self.service.login_failed(ip):
            await asyncio.sleep(delay)
        return unauthorized

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        response, command, code = await self._process(request)
        if self.metrics is not None:
            self.metrics.requests.labels(str(response.status), code).inc()
            # Label only known names: a client must not grow the metric set at will.
            label = command if command in COMMAND_NAMES else "other"
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)
        return response

    async def _process(self, request: web.Request) -> tuple[web.Response, str, str]:
        """The answer, and the command and response code for metrics."""
        if request.method not in ("POST", "PUT"):
            return _error(Code.INVALID_REQUEST, "use POST or PUT", 405,
                          headers={"Allow": "POST, PUT"}), "", Code.INVALID_REQUEST.value
        ip = request.remote or "-"
        user = await self._login(request)
        if isinstance(user, web.Response):
            code = Code.RATE_LIMITED if user.status == 429 else Code.UNAUTHORIZED
            return user, "", code.value
        body = await request.read()
        try:
            env = parse_request(body)
        except ProtocolError as exc:
            status = 400 if exc.code == Code.INVALID_REQUEST and not exc.command else 200
            return (json_response(error_response(exc).to_json(), status), exc.command,
                    exc.code.value)
        response = await self.service.execute(env, wait=self.wait, transport=f"rest:{user}",
                                              ip=ip, grants=self.settings.grants_for(user))
        headers = None
        if response.transient:
            status = 503
        elif response.code == Code.RATE_LIMITED:
            status = 429
            headers = {"Retry-After": str(response.data.get("retry_after", 1))}
        else:
            status = 200
        return json_response(response.to_json(), status, headers), env.name, response.code.value
