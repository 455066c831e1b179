"""REST: ``POST`` the envelope to the daemon's API with HTTP Basic auth.

Every request is answered in the HTTP response (the daemon waits up to its
``delivery.wait`` for the send result), so there is no fire-and-forget and
no callback topic. The body of every answer is read, whatever the HTTP
status: the daemon's 401 carries code 1100 in a JSON body. TLS certificates
are verified unless ``verify_tls = false``; one connection pool is kept
for the client's lifetime.
"""

from __future__ import annotations

import asyncio
import ssl
from contextlib import AbstractAsyncContextManager
from typing import ClassVar

import aiohttp

from otpd.client.config import RestSettings
from otpd.client.errors import ReplyTimeout, TransportError
from otpd.client.publishers.base import Inbox, Transport, cleanup
from otpd.netutil import basic_authorization, safe_url, tls_context

MAX_ANSWER = 1 << 20


class RestTransport(Transport):
    method = "rest"
    callback_in_envelope = False
    always_answers = True
    errors: ClassVar[tuple[type[BaseException], ...]] = (aiohttp.ClientError,)

    def __init__(self, config: RestSettings, connect_timeout: float) -> None:
        super().__init__(connect_timeout)
        self.config = config
        self._session: aiohttp.ClientSession | None = None

    def describe(self) -> str:
        return f"REST {safe_url(self.config.url)}"

    def _ssl(self) -> ssl.SSLContext | bool:
        if not self.config.url.startswith("https://"):
            return True
        if not self.config.verify_tls:
            return False
        return tls_context(self.config.tls_ca)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    def subscribe(self, topic: str) -> AbstractAsyncContextManager[Inbox]:
        raise TransportError("REST answers every request directly; it has no reply topics")

    async def publish(self, body: bytes, inbox: Inbox | None) -> None:
        raise TransportError("REST answers every request directly: use request()")

    async def exchange(self, body: bytes, timeout: float, command: str) -> bytes:
        """POST ``body``; the answer's bytes (a JSON object, whatever the status)."""
        c = self.config
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if c.username:
            headers["Authorization"] = basic_authorization(c.username, c.password)
        session = self._get_session()
        try:
            # Connecting is bounded by connect_timeout (sock_connect); the answer
            # may take the daemon's delivery.wait.
            async with asyncio.timeout(timeout + self.connect_timeout):
                async with session.post(c.url, data=body, headers=headers,
                                        ssl=self._ssl(), allow_redirects=False) as resp:
                    status = resp.status
                    received = bytearray()
                    async for chunk in resp.content.iter_chunked(65536):
                        received += chunk
                        if len(received) > MAX_ANSWER:
                            break
                    answer = bytes(received)
        except aiohttp.ConnectionTimeoutError:
            raise TransportError(f"{self.describe()}: connecting took longer than"
                                 f" {self.connect_timeout:g} s") from None
        except TimeoutError:
            raise ReplyTimeout(f"{command or 'request'}: no answer from {self.describe()}"
                               f" within {timeout:g} s (it may still be executed)",
                               command=command) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError(f"{self.describe()}: {type(exc).__name__}:"
                                 f" {str(exc)[:300]}") from exc
        if len(answer) > MAX_ANSWER:
            raise TransportError(f"{self.describe()}: answer larger than {MAX_ANSWER} bytes")
        if not answer.strip():
            raise TransportError(f"{self.describe()}: HTTP {status} with an empty body")
        if not answer.lstrip().startswith(b"{"):
            raise TransportError(f"{self.describe()}: HTTP {status}, not a JSON answer")
        return answer

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await cleanup("closing the REST session", session.close())
