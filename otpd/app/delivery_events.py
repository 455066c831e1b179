"""Status events: each final SMS delivery state, published on the brokers'
``status_topic`` (opt-in, per broker table).

The modem pool calls this object (``on_delivery``) from its report tasks: it
only queues (at most ``MAX_PENDING``; beyond that events are dropped,
counted and logged), so a slow store or broker never holds a report. A task
reads the outbox row (receiver, OTP reference), builds the event and hands it
to every consumer with a status topic; each consumer signs, buffers and
publishes it on its own (otpd.transports.consumer).

An event (integers and strings only, so that its signature is the same in any
language)::

    {"event": "delivery", "id": 42, "reference": "r-1", "receiver": "+*********567",
     "state": "delivered", "channel": "sms", "modem": "modem1",
     "sent_at": 1700000000, "at": 1700000007, "delivered_at": 1700000006,
     "reported_at": 1700000007}

``id`` is the outbox id (``otpd outbox``), ``reference`` only for request-otp,
``receiver`` masked (otpd.msisdn.mask), ``state`` delivered | undeliverable |
unknown (no final report within ``[sms] report_timeout``), ``at`` when the
state became final, ``delivered_at`` (the SMS centre's discharge time) only
when delivered, ``reported_at`` (the last status report's arrival) when a
report came.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

from otpd.channels.sms.delivery_stats import Delivery
from otpd.channels.sms.reports import DeliveryEvent
from otpd.msisdn import mask
from otpd.store import Store, StoreError
from otpd.transports.consumer import Consumer

log = logging.getLogger(__name__)

MAX_PENDING = 1000  # final states waiting for their outbox row to be read
LOG_INTERVAL = 60.0  # s between two "dropped" warnings


class DeliveryEvents:
    def __init__(self, store: Store, consumers: Sequence[Consumer]) -> None:
        self._store = store
        self._consumers = [c for c in consumers if c.common.status_topic]
        self._queue: asyncio.Queue[DeliveryEvent] = asyncio.Queue(MAX_PENDING)
        self.dropped = 0
        self._logged_at = -LOG_INTERVAL

    @property
    def wanted(self) -> bool:
        return bool(self._consumers)

    def __call__(self, event: DeliveryEvent) -> None:
        """The pool's ``on_delivery``: queue, never wait."""
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            now = time.monotonic()
            if now - self._logged_at >= LOG_INTERVAL:
                self._logged_at = now
                log.warning("status events: %d dropped in all, %d waiting for the store",
                            self.dropped, MAX_PENDING)

    async def run(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                body = await self._build(event)
            except Exception:  # a bug must not end the events
                log.exception("status event of message %d not built", event.message_id)
                continue
            for consumer in self._consumers:
                consumer.publish_event(body)

    async def _build(self, event: DeliveryEvent) -> dict[str, Any]:
        try:
            row = await self._store.message(event.message_id)
        except StoreError as exc:
            log.warning("status event of message %d without its receiver: %s",
                        event.message_id, exc)
            row = None
        body: dict[str, Any] = {"event": "delivery", "id": event.message_id}
        if row is not None and row.otp_reference:
            body["reference"] = row.otp_reference
        body["receiver"] = mask(row.receiver) if row is not None else ""
        body.update({"state": str(event.delivery), "channel": "sms", "modem": event.modem,
                     "sent_at": int(event.sent_at), "at": int(event.at)})
        if event.delivery is Delivery.DELIVERED and event.delivered_at is not None:
            body["delivered_at"] = int(event.delivered_at)
        reported = row.reported_at if row is not None else None
        if event.delivery is not Delivery.UNKNOWN:
            reported = event.at  # this report made it final
        if reported is not None:
            body["reported_at"] = int(reported)
        return body
