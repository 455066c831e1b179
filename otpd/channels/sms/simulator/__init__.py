"""A GSM modem on a pseudo-terminal, for the demo and for tests.

``model.py`` is the device (AT subset, SMS storage, faults, profiles) as pure
code, bytes in and bytes out; ``pty.py`` puts it behind a pseudo-terminal.
"""

from otpd.channels.sms.simulator.model import DeviceModel, SentMessage, Stored
from otpd.channels.sms.simulator.pty import ModemSimulator

__all__ = ["DeviceModel", "ModemSimulator", "SentMessage", "Stored"]
