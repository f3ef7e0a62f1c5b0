"""A Twisted-native NATS client: publish, subscribe, request/reply, headers, auth, TLS,
and reconnection with buffering. See docs/nats-client.rst."""

from .client import ClientOptions, NatsClient, State, Subscription, connect
from .errors import (
    AuthorizationError, BufferFullError, ConnectionClosedError, MaxPayloadError, NatsError,
    NatsTimeoutError, NoRespondersError, ProtocolError, ServerError, SlowConsumerError,
    StaleConnectionError,
)
from .message import Msg
from .protocol import NatsParser, NatsProtocol

__all__ = [
    "AuthorizationError", "BufferFullError", "ClientOptions", "ConnectionClosedError",
    "MaxPayloadError", "Msg", "NatsClient", "NatsError", "NatsParser", "NatsProtocol",
    "NatsTimeoutError", "NoRespondersError", "ProtocolError", "ServerError",
    "SlowConsumerError", "StaleConnectionError", "State", "Subscription", "connect",
]
