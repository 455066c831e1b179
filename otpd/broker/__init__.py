"""WebSocket message broker: ``otpd broker``."""

from otpd.broker.server import BrokerConfig, BrokerServer, BrokerSettings

__all__ = ["BrokerConfig", "BrokerServer", "BrokerSettings"]
