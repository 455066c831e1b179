"""otpd: SMS/email one-time-password gateway for a Raspberry Pi."""

__version__ = "0.1.0"
