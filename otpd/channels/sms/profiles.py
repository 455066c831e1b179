"""Simulator profiles: the quirks of real modem families (see reference/modem-quirks.md)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    manufacturer: str = "SIMULATED"
    model: str = "OTPD-SIM"
    revision: str = "1.0"
    imei: str = "359000000000001"
    imsi: str = "510100000000001"
    operator: str = "SIMULATED"
    echo_default: bool = True
    unsupported: str = "ERROR"  # final for unknown commands
    prompt: bytes = b"\r\n> "
    cpin_ok: bool = True  # False: "+CPIN: READY" without OK (Wavecom)
    index_base: int = 1  # Huawei numbers SMS storage from 0
    max_storages: int = 3  # Wavecom accepts only two in AT+CPMS
    storages: tuple[str, ...] = ("SM", "ME", "MT")
    pin_first: bool = False  # Qualcomm/ZTE: nothing but AT+CPIN while locked
    submit_urcs: tuple[str, ...] = ()  # lines sent before the prompt and before +CMGS
    periodic_urcs: tuple[str, ...] = ()  # "{csq}" is replaced by the signal value
    periodic_interval: float = 10.0
    trailing_blank: bool = False  # Huawei E1752 adds empty lines after a final
    cgsn_prefixed: bool = False  # SIM76xx answers '+CGSN: "<imei>"'
    reject_cnmi: tuple[str, ...] = ()  # CNMI settings answered with ERROR
    esc_reply: bool = True  # OK after ESC aborts input


PROFILES: dict[str, Profile] = {
    "generic": Profile("generic"),
    "huawei": Profile(
        "huawei",
        manufacturer="huawei",
        model="E173",
        revision="11.126.85.00.209",
        unsupported="COMMAND NOT SUPPORT",
        index_base=0,
        storages=("ME", "MT", "SM", "SR"),
        submit_urcs=("^RSSI:{csq}",),
        periodic_urcs=("^RSSI:{csq}", "^BOOT:31134822,0,0,0,67"),
        trailing_blank=True,
    ),
    "zte": Profile(
        "zte",
        manufacturer="ZTE CORPORATION",
        model="MF190",
        revision="BD_MF190V1.0.0B04",
        pin_first=True,
        storages=("ME", "MT", "SM", "SR"),
        submit_urcs=('+ZDONR: "SIMULATED",510,10,"CS_PS","ROAM_OFF"', '+ZPASR: "UMTS"'),
        reject_cnmi=("2,1,0,2",),
    ),
    "simcom": Profile(
        "simcom",
        manufacturer="SIMCOM INCORPORATED",
        model="SIMCOM_SIM7600G-H",
        revision="LE20B03SIM7600M22",
        prompt=b"\r\n>\r\n",
        cgsn_prefixed=True,
        reject_cnmi=("2,1,0,2",),
        esc_reply=False,
    ),
    "quectel": Profile(
        "quectel",
        manufacturer="Quectel",
        model="EC25",
        revision="EC25ECGAR06A04M1G",
        submit_urcs=('+QIND: "csq",18,99',),
    ),
    "wavecom": Profile(
        "wavecom",
        manufacturer=" WAVECOM MODEM",
        model=" MULTIBAND  900E  1800 ",
        revision="",
        cpin_ok=False,
        max_storages=2,
        storages=("SM", "BM", "SR"),
        submit_urcs=('+CMTI: "SM",1',),
    ),
}
