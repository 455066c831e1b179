"""``[delivery]``: how long a request waits for its result, retries, message lifetimes,
and how much work a node takes from a queue it shares with other nodes.

``share_work`` ("auto": on with ``[store] backend = "redis"``, the several-node
setup; "on"; "off"): broker consumers take work in proportion to the node's
free sending capacity (``horizon`` s of sending at the observed send time, at
most ``max_backlog`` messages per channel), stop taking while the node cannot
send (trying one message again ``probe_after`` s after its sends kept
failing), and what the node stored but cannot send in time is handed back to
the shared queue (all it holds once it cannot send for ``handover_after`` s).
See otpd.delivery.admission.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from otpd.delivery.admission import AdmissionSettings
from otpd.settings_reader import Section


@dataclass(frozen=True)
class DeliverySettings:
    wait: float
    email_workers: int
    retry_base: float
    retry_max: float
    default_lifetime: int  # for send-* without expiration
    max_lifetime: int
    share_work: str = "auto"  # auto | on | off
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)


def parse_delivery_settings(s: Section, otp_default_lifetime: int,
                            otp_max_lifetime: int) -> DeliverySettings:
    """The lifetimes default to the OTP ones (plain messages live at least an hour)."""
    default_lifetime = s.int("default_lifetime", otp_default_lifetime, min=10, max=7 * 86400)
    max_lifetime = s.int("max_lifetime", max(otp_max_lifetime, 3600), min=10, max=7 * 86400)
    if max_lifetime < default_lifetime:
        s.error("max_lifetime", "must be >= delivery.default_lifetime")
    out = DeliverySettings(
        wait=s.float("wait", 20.0, min=0.0, max=300.0),
        email_workers=s.int("email_workers", 2, min=1, max=32),
        retry_base=s.float("retry_base", 2.0, min=0.1, max=600.0),
        retry_max=s.float("retry_max", 60.0, min=0.1, max=3600.0),
        default_lifetime=default_lifetime,
        max_lifetime=max_lifetime,
        share_work=s.str("share_work", "auto", choices=("auto", "on", "off")),
        admission=AdmissionSettings(
            horizon=s.float("horizon", 5.0, min=0.5, max=600.0),
            max_backlog=s.int("max_backlog", 256, min=1, max=100_000),
            probe_after=s.float("probe_after", 30.0, min=1.0, max=3600.0),
            handover_after=s.float("handover_after", 5.0, min=0.0, max=3600.0),
        ),
    )
    s.finish()
    return out
