"""WebSocket message broker: ``otpd broker``."""

from otpd.broker.server import BrokerConfig, BrokerServer

__all__ = ["BrokerConfig", "BrokerServer"]
