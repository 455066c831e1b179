"""The ``handover`` command on a running daemon: a message another node sealed
is sent once and not counted against the receiver again; a forged, re-addressed,
extended or expired one is refused."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from otpd.channels.sms.simulator import ModemSimulator
from otpd.delivery.handover import handover_envelope
from otpd.sealing import Sealer
from tests.delivery.test_handover import job
from tests.support.brokers import receiver
from tests.support.daemon import start_daemon, write_config
from tests.support.gateway import Gateway
from tests.support.mail import SmtpServer


@pytest.fixture
async def gateway(tmp_path: Path, smtp: SmtpServer,
                  session: aiohttp.ClientSession) -> AsyncIterator[Gateway]:
    """A daemon with the default limits on (the suite's usual one has none)."""
    config = write_config(tmp_path, smtp_port=smtp.port, limits="enabled = true")
    gw = Gateway(await start_daemon(config, session), smtp,
                 ModemSimulator(tmp_path / "modem", name="sim1"))
    try:
        yield gw
    finally:
        await gw.close()


@pytest.fixture
def sealer(gateway: Gateway) -> Sealer:
    engine = gateway.run.daemon.engine
    assert engine is not None
    return engine.sealer


async def test_a_handover_sealed_by_a_node_is_sent_once_and_not_counted_again(
        gateway: Gateway, sealer: Sealer) -> None:
    to = receiver()
    # The receiver's limits are used up on this node (30 s between two messages
    # to one receiver): a handover is not a new request.
    first = await gateway.call("send-email", {"receiver": to, "subject": "S", "message": "m"})
    assert first["response_code"] == "0000", first
    assert (await gateway.call("send-email", {"receiver": to, "subject": "S",
                                              "message": "m2"}))["response_code"] == "1401"
    data = handover_envelope(job(to), sealer.seal_handover)["data"]
    body = await gateway.call("handover", data)
    assert body["response_code"] == "0000", body
    assert (await gateway.call("handover", data))["response_code"] == "1201"
    mails = [m for m in gateway.mails_to(to) if "481516" in m.get_payload()]
    assert len(mails) == 1 and mails[0]["Subject"] == "Code"


async def test_a_forged_or_altered_handover_is_refused(gateway: Gateway, sealer: Sealer) -> None:
    to, attacker = receiver(), receiver()
    data = handover_envelope(job(to), sealer.seal_handover)["data"]
    forged = handover_envelope(job(to), Sealer(b"x" * 32).seal_handover)["data"]
    for bad in (forged, {**data, "receiver": attacker},
                {**data, "expiration": data["expiration"] + 3600}):
        body = await gateway.call("handover", bad)
        assert body["response_code"] == "1100", body
    expired = handover_envelope(job(to, expires_at=time.time() - 1), sealer.seal_handover)
    assert (await gateway.call("handover", expired["data"]))["response_code"] == "1203"
    assert gateway.mails_to(to) == [] and gateway.mails_to(attacker) == []
