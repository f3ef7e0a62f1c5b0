"""wsprovider: WebSocket as a transport for the ``wasmcloud:messaging`` contract."""

from ._version import __version__
from .config import ConfigError, ProviderConfig
from .interfaces import ILattice, IMessageHandler, IMessagingConsumer, ISessionRegistry
from .message import (BrokerMessage, BufferFull, MessagingError, NoResponders, NotConnected,
                      PermissionDenied, RequestTimeout)
from .provider import WebSocketMessagingProvider

__all__ = [
    "__version__", "BrokerMessage", "MessagingError", "RequestTimeout", "NoResponders", "NotConnected",
    "PermissionDenied", "BufferFull", "IMessagingConsumer", "IMessageHandler", "ILattice",
    "ISessionRegistry", "ProviderConfig", "ConfigError", "WebSocketMessagingProvider",
]
