"""``otpd broker``: run the WebSocket message broker until SIGINT/SIGTERM;
SIGHUP reloads the users and ACL files."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path

from otpd.auth.htpasswd import HtpasswdError
from otpd.broker.acl import AclError
from otpd.broker.server import ACL_FILE_NAME, BrokerServer, BrokerSettings

log = logging.getLogger("otpd.broker")

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError("must be HOST:PORT with a port 0..65535")
    return host, int(port)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("must be an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``broker`` on the main CLI's subparsers; sets ``func``."""
    p = subparsers.add_parser(
        "broker",
        help="run the WebSocket message broker (WSMessageBroker compatible)",
        description=(
            "Relay text frames between authenticated WebSocket clients on the same "
            "?topic=. Clients authenticate with HTTP Basic against an htpasswd file "
            "(bcrypt, apr1 or {SHA}); off loopback it needs TLS. The PHP OTP-Publisher"
            " client sends the user "
            "name as the password, so give its user that password. Who may publish "
            "and subscribe on which topic is in the ACL file (--acl); a user without "
            "a rule there gets nothing. SIGHUP reloads both files."
        ),
    )
    p.add_argument(
        "--listen",
        type=_listen,
        default=("127.0.0.1", 9000),
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1:9000)",
    )
    p.add_argument("--htpasswd", type=Path, required=True, metavar="FILE", help="users file")
    p.add_argument(
        "--acl",
        type=Path,
        metavar="FILE",
        help=f"topic permissions (default: {ACL_FILE_NAME} next to the users file; "
        "see etc/broker.acl.example)",
    )
    p.add_argument("--path", default="/ws", help="WebSocket path (default /ws; /ws/ also works)")
    p.add_argument("--tls-cert", type=Path, metavar="FILE", help="PEM certificate (enables wss)")
    p.add_argument("--tls-key", type=Path, metavar="FILE", help="PEM private key")
    p.add_argument("--allow-plain-http", action="store_true",
                   help="listen off loopback without TLS (only behind a TLS-terminating proxy)")
    p.add_argument(
        "--max-message",
        type=_positive,
        default=64 * 1024,
        metavar="N",
        help="largest message in bytes; larger ones close the connection (default 65536)",
    )
    p.add_argument(
        "--queue",
        type=_positive,
        default=1024 * 1024,
        metavar="N",
        help="bytes queued per client before a slow client is dropped (default 1048576)",
    )
    p.add_argument(
        "--max-connections",
        type=_positive,
        metavar="N",
        help="open connections in all; more are reset before HTTP (default: from the"
        " descriptor limit, at most 1024)",
    )
    p.add_argument(
        "--max-connections-per-address",
        type=_positive,
        metavar="N",
        help="open connections per client address, IPv6 per /64 (default: a quarter of"
        " --max-connections, at most 64)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point for ``otpd broker``; returns the process exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host, port = args.listen
    config = BrokerSettings(
        htpasswd=args.htpasswd,
        acl=args.acl,
        host=host,
        port=port,
        path=args.path,
        max_message=args.max_message,
        queue_bytes=max(args.queue, args.max_message),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        allow_plain=args.allow_plain_http,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
    )
    errors = config.validate()
    if errors:
        for error in errors:
            print(f"otpd broker: {error}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        return asyncio.run(_serve(config))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return EXIT_OK


async def _serve(config: BrokerSettings) -> int:
    broker = BrokerServer(config)
    try:
        await broker.start()
    except (HtpasswdError, AclError) as exc:
        for line in str(exc).splitlines():  # one per problem, each naming file and line
            print(f"otpd broker: {line}", file=sys.stderr)
        return EXIT_CONFIG
    except (OSError, ssl.SSLError) as exc:
        print(f"otpd broker: cannot start: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, broker.reload)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await broker.stop()
    return EXIT_OK
