"""``otpd client ...``: every publisher operation from the command line.

Each command prints the answer as one JSON object on stdout
(``{"command", "response_code", "data", "message"?}``) and exits 0 when the
answer is ok (0000, or 1111 accepted), 1 for any other code, 2 for a bad
configuration, 3 when no answer could be had (not delivered, or timed out;
the reason goes to stderr). Options common to every command may come before
or after its name: ``--config`` (default ``$OTPD_CLIENT_CONFIG`` or
``/etc/otpd/client.toml``), ``--method``, ``--timeout``, ``--wait``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from otpd.client.api import AsyncOtpClient
from otpd.client.config import METHODS, ClientSettings, default_config_path, load_client_config
from otpd.client.errors import OtpClientError, ReplyTimeout
from otpd.client.response import OtpResponse
from otpd.settings_reader import ConfigError

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_CONFIG = 2
EXIT_NO_ANSWER = 3

Operation = Callable[[AsyncOtpClient, argparse.Namespace], Awaitable[OtpResponse]]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a whole number of seconds") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 3600")
    return value


def _common() -> argparse.ArgumentParser:
    """Options accepted both before and after the command name (absent unless given,
    so a value given before the name is not reset by the command's defaults)."""
    default = argparse.SUPPRESS
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", "-c", type=Path, default=default,
                   help="client configuration (default $OTPD_CLIENT_CONFIG or"
                        " /etc/otpd/client.toml)")
    p.add_argument("--method", "-m", choices=METHODS, default=default,
                   help="override [client] method")
    p.add_argument("--timeout", type=_seconds, default=default,
                   help="override [client] timeout (s)")
    p.add_argument("--wait", dest="wait", action="store_true", default=default,
                   help="over a broker, wait for the daemon's result (wait_result)")
    return p


def _load(args: argparse.Namespace) -> ClientSettings | None:
    path = getattr(args, "config", None) or default_config_path()
    try:
        return load_client_config(path, getattr(args, "method", None))
    except ConfigError as exc:
        print(f"{path}: configuration is not valid:", file=sys.stderr)
        for line in exc.errors:
            print(f"  {line}", file=sys.stderr)
        return None


async def _execute(config: ClientSettings, op: Operation, args: argparse.Namespace) -> int:
    try:
        client = AsyncOtpClient(config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return EXIT_CONFIG
    try:
        response = await op(client, args)
    except ReplyTimeout as exc:
        print(f"otpd client: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    except OtpClientError as exc:
        print(f"otpd client: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    except (ValueError, TypeError) as exc:
        print(f"otpd client: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    finally:
        await client.close()
    print(json.dumps(response.to_json(), ensure_ascii=False))
    return EXIT_OK if response.ok else EXIT_REFUSED


def _runner(op: Operation) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        config = _load(args)
        if config is None:
            return EXIT_CONFIG
        return asyncio.run(_execute(config, op, args))

    return run


def _wait(args: argparse.Namespace) -> bool | None:
    return True if getattr(args, "wait", None) else None


def _timeout(args: argparse.Namespace) -> float | None:
    value = getattr(args, "timeout", None)
    return float(value) if value is not None else None


# -- operations ------------------------------------------------------------------


async def _create(c: AsyncOtpClient, a: argparse.Namespace) -> OtpResponse:
    return await c.create_otp(a.receiver, a.reference, a.lifetime, a.message, a.param,
                              a.subject, a.id, wait_result=_wait(a), timeout=_timeout(a))


async def _verify(c: AsyncOtpClient, a: argparse.Namespace) -> OtpResponse:
    return await c.verify_otp(a.receiver, a.otp, a.reference, a.param, timeout=_timeout(a))


async def _sms(c: AsyncOtpClient, a: argparse.Namespace) -> OtpResponse:
    return await c.send_sms(a.receiver, a.message, a.lifetime, a.id, wait_result=_wait(a),
                            timeout=_timeout(a))


async def _email(c: AsyncOtpClient, a: argparse.Namespace) -> OtpResponse:
    return await c.send_email(a.receiver, a.subject, a.message, a.lifetime, a.id,
                              wait_result=_wait(a), timeout=_timeout(a))


async def _message(c: AsyncOtpClient, a: argparse.Namespace) -> OtpResponse:
    return await c.send_message(a.receiver, a.message, a.lifetime, a.subject, a.id,
                                wait_result=_wait(a), timeout=_timeout(a))


async def _block(c: AsyncOtpClient, a: argparse.Namespace) -> OtpResponse:
    return await c.block_msisdn(a.receiver, wait_result=_wait(a), timeout=_timeout(a))


async def _unblock(c: AsyncOtpClient, a: argparse.Namespace) -> OtpResponse:
    return await c.unblock_msisdn(a.receiver, wait_result=_wait(a), timeout=_timeout(a))


async def _modems(c: AsyncOtpClient, a: argparse.Namespace) -> OtpResponse:
    return await c.get_modem_list(timeout=_timeout(a))


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    where = {"rest": config.rest.url, "amqp": config.amqp.topic, "redis": config.redis.topic,
             "mqtt": config.mqtt.topic, "ws": config.ws.topic}[config.method]
    managed = f", manage_otp with a {config.manage_otp.store} store" \
        if config.manage_otp.enabled else ""
    target = where if config.method == "rest" else f"topic {where!r}"
    print(f"{config.source}: OK (method {config.method}, {target}{managed})")
    return EXIT_OK


# -- parser ----------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``client`` (with its commands) on the main CLI's subparsers."""
    common = _common()
    p = subparsers.add_parser(
        "client", parents=[_common()],
        help="publish commands to otpd (REST, RabbitMQ, Redis, MQTT, WebSocket)",
        description="Send commands to otpd as an application server would, over the method"
                    " of the client configuration; print the JSON answer.",
    )
    sub = p.add_subparsers(dest="client_command", required=True, metavar="COMMAND")

    def leaf(name: str, help_text: str, op: Operation) -> argparse.ArgumentParser:
        q = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        q.set_defaults(func=_runner(op))
        return q

    def lifetime(q: argparse.ArgumentParser) -> None:
        q.add_argument("--lifetime", type=_positive, default=300,
                       help="seconds until it expires (default 300)")

    def ident(q: argparse.ArgumentParser) -> None:
        q.add_argument("--id", default=None,
                       help="message id: the same id is never sent twice (default: random)")

    def params(q: argparse.ArgumentParser) -> None:
        q.add_argument("--param", action="append", default=[], metavar="VALUE",
                       help="param1..param4, in order (repeat up to 4 times)")

    q = leaf("create-otp", "send a one-time password (request-otp)", _create)
    q.add_argument("receiver", help="phone number or email address")
    q.add_argument("reference", help="transaction reference (needed to verify)")
    q.add_argument("--message", default="Your OTP is %s",
                   help="text with exactly one %%s for the code (default 'Your OTP is %%s')")
    q.add_argument("--subject", default=None, help="email subject")
    lifetime(q)
    ident(q)
    params(q)

    q = leaf("verify-otp", "check a one-time password (verify-otp)", _verify)
    q.add_argument("receiver")
    q.add_argument("reference")
    q.add_argument("otp", help="the code the user typed")
    params(q)

    q = leaf("send-sms", "send an SMS", _sms)
    q.add_argument("receiver", help="phone number")
    q.add_argument("message")
    lifetime(q)
    ident(q)

    q = leaf("send-email", "send an email", _email)
    q.add_argument("receiver", help="email address")
    q.add_argument("subject")
    q.add_argument("message")
    lifetime(q)
    ident(q)

    q = leaf("send-message", "send an SMS, or an email when the receiver has @", _message)
    q.add_argument("receiver")
    q.add_argument("message")
    q.add_argument("--subject", default=None, help="email subject")
    lifetime(q)
    ident(q)

    q = leaf("block", "block a receiver (block-msisdn)", _block)
    q.add_argument("receiver")

    q = leaf("unblock", "unblock a receiver (unblock-msisdn)", _unblock)
    q.add_argument("receiver")

    leaf("modem-list", "list the gateway's modems (get-modem-list)", _modems)

    q = sub.add_parser("check-config", parents=[common],
                       help="validate the client configuration and exit")
    q.set_defaults(func=cmd_check_config)
