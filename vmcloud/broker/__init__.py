"""The embedded STOMP broker: realm of destinations (``realm``), twisted.cred users (``auth``),
wire protocol (``protocol``), in-process sessions (``local``), assembled by ``Broker``."""

from vmcloud.broker.broker import Broker
from vmcloud.broker.limits import BrokerLimits
from vmcloud.broker.realm import BrokerStats

__all__ = ["Broker", "BrokerLimits", "BrokerStats"]
