"""``[[modem]]`` and ``[sms]`` configuration tables -> frozen, validated settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from otpd.channels.sms.at import AtSyntaxError, check_command
from otpd.channels.sms.sim_health import HealthSettings
from otpd.msisdn import InvalidReceiver, canonical_prefix
from otpd.settings_reader import Section

BAUD_RATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
STORAGES = ("SM", "ME", "MT")


@dataclass(frozen=True)
class ModemSettings:
    name: str
    port: str
    baud: int = 115200
    pin: str = field(default="", repr=False)  # secret: never in repr, logs or status
    prefixes: tuple[str, ...] = ()  # canonical "+<digits>"
    enabled: bool = True
    max_parts: int = 6
    # Ask for status reports (TP-SRR) and have the modem pass them on (AT+CNMI
    # ds=1, else ds=2); off by itself on a modem that accepts neither.
    delivery_reports: bool = True
    command_timeout: float = 5.0
    prompt_timeout: float = 10.0
    send_timeout: float = 60.0
    init_commands: tuple[str, ...] = ()
    delete_sent: bool = True
    read_inbox: bool = False
    storage: str = "SM"


@dataclass(frozen=True)
class SmsSettings:
    modems: tuple[ModemSettings, ...] = ()
    retry_delay: float = 5.0  # s before a failed job is retried when no other modem can try it
    probe_interval: float = 5.0  # s before the first probe of a modem taken out of rotation
    max_probe_interval: float = 300.0  # backoff cap for probing
    max_failures_before_reset: int = 3  # consecutive failed sends before a reset
    refresh_interval: float = 60.0  # s between signal/registration checks of an idle modem
    not_ready_timeout: float = 20.0  # s to wait out "SIM busy" answers
    cpin_grace: float = 2.0  # s to wait for the OK some modems never send after +CPIN:
    # s without a send before a modem's stored copies are swept (see otpd.channels.sms.modem);
    # not a configuration key: the default suits every modem, tests shorten it.
    idle_sweep_delay: float = 2.0
    report_timeout: float = 3600.0  # s without a final report before delivery is "unknown"
    delivery_window: float = 21600.0  # s of outcomes in each SIM's recent delivery statistics
    # When a SIM the network seems to filter leaves the rotation (the filter_* keys).
    health: HealthSettings = field(default_factory=HealthSettings)


def parse_sms_settings(
    modems: list[Section], sms: Section | None, country_code: str
) -> SmsSettings:
    """Read every ``[[modem]]`` table and the optional ``[sms]`` table.

    Errors are recorded in the sections' shared error list (the caller raises
    ConfigError); the returned settings hold defaults where a value was bad.
    """
    parsed: list[ModemSettings] = []
    seen: dict[str, int] = {}
    for index, section in enumerate(modems):
        modem = _parse_modem(section, country_code)
        if modem.name in seen:
            section.error("name", f'duplicate modem name "{modem.name}"')
        elif modem.name:
            seen[modem.name] = index
        parsed.append(modem)
    if sms is None:
        return SmsSettings(modems=tuple(parsed))
    result = SmsSettings(
        modems=tuple(parsed),
        retry_delay=sms.float("retry_delay", 5.0, min=0.0, max=3600.0),
        probe_interval=sms.float("probe_interval", 5.0, min=0.01, max=3600.0),
        max_probe_interval=sms.float("max_probe_interval", 300.0, min=0.01, max=86400.0),
        max_failures_before_reset=sms.int("max_failures_before_reset", 3, min=1, max=1000),
        refresh_interval=sms.float("refresh_interval", 60.0, min=0.1, max=86400.0),
        not_ready_timeout=sms.float("not_ready_timeout", 20.0, min=0.0, max=600.0),
        cpin_grace=sms.float("cpin_grace", 2.0, min=0.05, max=30.0),
        report_timeout=sms.float("report_timeout", 3600.0, min=1.0, max=7 * 86400.0),
        delivery_window=sms.float("delivery_window", 21600.0, min=60.0, max=30 * 86400.0),
        health=_health(sms),
    )
    sms.finish()
    return result


def _health(sms: Section) -> HealthSettings:
    d = HealthSettings()
    probe = sms.float("filter_probe_interval", d.probe_interval, min=1.0, max=7 * 86400.0)
    max_probe = sms.float("filter_max_probe_interval", d.max_probe_interval, min=1.0,
                          max=30 * 86400.0)
    if max_probe < probe:
        sms.error("filter_max_probe_interval", "must be >= filter_probe_interval")
        max_probe = probe
    return HealthSettings(
        enabled=sms.bool("filter_check", d.enabled),
        # Fewer than 5 outcomes is noise: a few wrong numbers would filter a good SIM.
        min_sample=sms.int("filter_min_sample", d.min_sample, min=5, max=100_000),
        relative=sms.float("filter_relative", d.relative, min=0.0, max=1.0),
        floor=sms.float("filter_floor", d.floor, min=0.0, max=1.0),
        probe_interval=probe,
        max_probe_interval=max_probe,
        recover_probes=sms.int("filter_recover_probes", d.recover_probes, min=1, max=100),
    )


def _delivery_reports(section: Section) -> bool:
    """``delivery_reports`` (default on); ``status_report``, its older name, still read."""
    if section.has("status_report"):
        old = section.bool("status_report", True)
        if section.has("delivery_reports"):
            new = section.bool("delivery_reports", True)
            if new != old:
                section.error("status_report", "is the old name of delivery_reports;"
                              " give only delivery_reports")
            return new
        return old
    return section.bool("delivery_reports", True)


def _parse_modem(section: Section, country_code: str) -> ModemSettings:
    name = section.str("name", "", required=True).strip()
    port = section.str("port", "", required=True).strip()
    baud = section.int("baud", 115200)
    if baud not in BAUD_RATES:
        section.error("baud", f"must be one of {', '.join(map(str, BAUD_RATES))}")
        baud = 115200
    pin = section.secret("pin")
    if pin and not (pin.isascii() and pin.isdigit() and 4 <= len(pin) <= 8):
        section.error("pin", "must be 4 to 8 digits")  # never echo the value
        pin = ""
    prefixes: list[str] = []
    for i, raw in enumerate(section.str_list("prefixes")):
        try:
            prefixes.append(canonical_prefix(raw, country_code))
        except InvalidReceiver as exc:
            section.error(f"prefixes[{i}]", str(exc))
    init_commands: list[str] = []
    for i, raw in enumerate(section.str_list("init_commands")):
        try:
            init_commands.append(check_command(raw.strip()))
        except AtSyntaxError as exc:
            section.error(f"init_commands[{i}]", str(exc))
    result = ModemSettings(
        name=name,
        port=port,
        baud=baud,
        pin=pin,
        prefixes=tuple(prefixes),
        enabled=section.bool("enabled", True),
        max_parts=section.int("max_parts", 6, min=1, max=255),
        delivery_reports=_delivery_reports(section),
        command_timeout=section.float("command_timeout", 5.0, min=0.05, max=600.0),
        prompt_timeout=section.float("prompt_timeout", 10.0, min=0.05, max=600.0),
        send_timeout=section.float("send_timeout", 60.0, min=0.05, max=600.0),
        init_commands=tuple(init_commands),
        delete_sent=section.bool("delete_sent", True),
        read_inbox=section.bool("read_inbox", False),
        storage=section.str("storage", "SM", choices=STORAGES),
    )
    section.finish()
    return result
