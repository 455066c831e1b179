"""Handshake: path, topic, Basic auth (base64 and OTP-Publisher's raw form), TLS."""

from __future__ import annotations

import base64
import ssl
import subprocess
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage, InvalidStatus

from otpd.auth.basic import parse_basic_auth
from otpd.broker import BrokerConfig, BrokerServer
from tests.support.waiting import wait_until

from .conftest import MakeBroker, RawClient, basic, client, recv_text


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Basic " + base64.b64encode(b"alice:pw").decode(), ("alice", "pw")),
        ("basic " + base64.b64encode(b"alice:p:w:").decode(), ("alice", "p:w:")),
        ("Basic " + base64.b64encode(b"alice:").decode(), ("alice", "")),
        ("Basic " + base64.b64encode("jörg:pä".encode()).decode(), ("jörg", "pä")),
        ("Basic kamshory:kamshory", ("kamshory", "kamshory")),  # OTP-Publisher
        ("Basic user:pa ss:x", ("user", "pa ss:x")),
        ("Basic " + base64.b64encode(b"nocolon").decode(), None),
        ("Basic " + base64.b64encode(b":pw").decode(), None),
        ("Basic " + base64.b64encode(b"\xff:pw").decode(), None),
        ("Basic ", None),
        ("Bearer abc", None),
        ("Basic nocolon-not-base64!", None),
        (None, None),
        ("", None),
    ],
)
def test_parse_basic_auth(header: str | None, expected: tuple[str, str] | None) -> None:
    assert parse_basic_auth(header) == expected


async def status_of(broker: BrokerServer, **kwargs: object) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        async with client(broker, **kwargs):  # type: ignore[arg-type]
            pass
    return info.value


async def test_login_ok_and_counted(broker: BrokerServer) -> None:
    async with client(broker, user="bob"), client(broker, user="alice", topic="other"):
        await wait_until(lambda: broker.clients == 2)
    await wait_until(lambda: broker.clients == 0)


async def test_wrong_password_401(broker: BrokerServer) -> None:
    exc = await status_of(broker, user="alice", password="nope")
    assert exc.response.status_code == 401
    assert exc.response.headers["WWW-Authenticate"] == 'Basic realm="otpd-broker"'
    assert broker.clients == 0


async def test_unknown_user_401(broker: BrokerServer) -> None:
    exc = await status_of(broker, user="mallory", password="x")
    assert exc.response.status_code == 401


async def test_missing_auth_401(broker: BrokerServer) -> None:
    exc = await status_of(broker, user="")
    assert exc.response.status_code == 401
    assert exc.response.headers["WWW-Authenticate"] == 'Basic realm="otpd-broker"'


async def test_plaintext_entry_refused(broker: BrokerServer) -> None:
    exc = await status_of(broker, user="plain", password="plain-pw")
    assert exc.response.status_code == 401


async def test_two_authorization_headers_refused(broker: BrokerServer) -> None:
    raw = await RawClient.open(
        broker.port,
        "/ws?topic=sms",
        basic("alice", "alice-pw") + "\r\nAuthorization: " + basic("bob", "b:o:b"),
    )
    assert raw.status == 401
    raw.abort()


@pytest.mark.parametrize("query", ["", "?topic=", "?other=1", "?topic=a&topic=b"])
async def test_bad_topic_400(broker: BrokerServer, query: str) -> None:
    raw = await RawClient.open(broker.port, "/ws" + query, basic("alice", "alice-pw"))
    assert raw.status == 400
    raw.abort()


async def test_wrong_path_404(broker: BrokerServer) -> None:
    exc = await status_of(broker, path="/other")
    assert exc.response.status_code == 404


@pytest.mark.parametrize("path", ["/ws", "/ws/"])
async def test_path_with_or_without_slash(broker: BrokerServer, path: str) -> None:
    async with client(broker, path=path) as ws:
        await ws.ping()
        assert broker.clients == 1


async def test_configured_path(make_broker: MakeBroker) -> None:
    broker = await make_broker(path="/broker/")
    async with client(broker, path="/broker"):
        await wait_until(lambda: broker.clients == 1)
    exc = await status_of(broker, path="/ws")
    assert exc.response.status_code == 404


async def test_raw_user_user_header_like_otp_publisher(broker: BrokerServer) -> None:
    ok = await RawClient.open(broker.port, "/ws/?topic=sms", "Basic kamshory:kamshory")
    assert ok.status == 101
    ok.abort()
    # Raw form, wrong password: still checked.
    bad = await RawClient.open(broker.port, "/ws/?topic=sms", "Basic alice:alice")
    assert bad.status == 401
    assert b'WWW-Authenticate: Basic realm="otpd-broker"' in bad.head
    bad.abort()


async def test_users_file_reloaded(broker: BrokerServer, users_file: Path) -> None:
    from otpd.auth.htpasswd import set_user

    set_user(users_file, "carol", "carol-pw", cost=4)
    assert broker._users is not None
    broker._users._next_reload_check = 0.0  # skip the 1 s throttle
    async with client(broker, user="carol", password="carol-pw"):
        await wait_until(lambda: broker.clients == 1)


def test_config_validation(users_file: Path) -> None:
    with pytest.raises(ValueError, match="tls_cert and tls_key"):
        BrokerServer(BrokerConfig(htpasswd=users_file, tls_cert=Path("c")))
    with pytest.raises(ValueError, match="path"):
        BrokerServer(BrokerConfig(htpasswd=users_file, path="ws"))
    with pytest.raises(ValueError, match="queue_bytes"):
        BrokerServer(BrokerConfig(htpasswd=users_file, queue_bytes=10))


async def test_tls(make_broker: MakeBroker, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    broker = await make_broker(tls_cert=cert, tls_key=key)
    ctx = ssl.create_default_context(cafile=str(cert))
    url = f"wss://127.0.0.1:{broker.port}/ws?topic=t"
    auth = {"Authorization": basic("alice", "alice-pw")}
    async with (
        connect(url, ssl=ctx, additional_headers=auth) as a,
        connect(url, ssl=ctx, additional_headers=auth) as b,
    ):
        await wait_until(lambda: broker.clients == 2)
        await a.send("over tls")
        assert await recv_text(b) == "over tls"
    # Plain ws:// to a TLS port does not get through.
    with pytest.raises(InvalidMessage):
        async with client(broker, topic="t"):
            pass
