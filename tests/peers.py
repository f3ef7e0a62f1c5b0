"""Real WebSocket peers for the trial suite, and a provider started on a free port.

The suite runs under Twisted's asyncio reactor (see README: ``trial --reactor=asyncio``),
so the independent ``websockets`` library runs on the same event loop as the service:
its coroutines become Deferreds with ``Deferred.fromFuture``. Autobahn's own client is the
second peer. Every wait is bounded by the test's timeout; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import json

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, endpoints, reactor

from wsprovider import WebSocketMessagingProvider
from wsprovider.config import ProviderConfig


def as_deferred(coro) -> defer.Deferred:
    return defer.Deferred.fromFuture(asyncio.ensure_future(coro))


@defer.inlineCallbacks
def start_provider(testcase, config=None, handlers=(), lattice=None):
    """Start a server-mode provider on 127.0.0.1:<free port>; stopped at test cleanup.

    ``handlers``: (component_id, handler, link_config) triples linked as sources.
    """
    values = {"MODE": "server", "URI": "tcp:0:interface=127.0.0.1"}
    values.update(config or {})
    provider = WebSocketMessagingProvider(ProviderConfig.from_mapping(values), lattice=lattice)
    provider.startService()
    testcase.addCleanup(provider.shutdown)
    yield provider.when_ready()
    for component_id, handler, link_config in handlers:
        yield provider.receive_link_config_as_source(component_id, link_config, handler=handler)
    return provider


def ws_url(provider, path="ws") -> str:
    return f"ws://127.0.0.1:{provider.port}/{path}"


class WebsocketsPeer:
    """A client built on the ``websockets`` library (independent of Autobahn)."""

    def __init__(self, conn):
        self.conn = conn
        self.welcome = None

    @classmethod
    @defer.inlineCallbacks
    def connect(cls, url, subprotocols=("wsprovider.v1.json",), expect_welcome=True, **kwargs):
        import websockets
        conn = yield as_deferred(websockets.connect(
            url, subprotocols=list(subprotocols) if subprotocols else None, **kwargs))
        peer = cls(conn)
        if expect_welcome:
            peer.welcome = yield peer.recv_json()
            assert peer.welcome["type"] == "welcome", peer.welcome
        return peer

    @property
    def session_id(self):
        return self.welcome["session_id"]

    @property
    def address(self):
        return self.welcome["reply_to"]

    def send(self, data):
        return as_deferred(self.conn.send(data))

    def send_json(self, obj):
        return self.send(json.dumps(obj))

    def recv(self):
        return as_deferred(self.conn.recv())

    @defer.inlineCallbacks
    def recv_json(self):
        data = yield self.recv()
        return json.loads(data)

    @defer.inlineCallbacks
    def recv_type(self, kind):
        """Receive frames until one of ``type`` ``kind``; return it."""
        while True:
            frame = yield self.recv_json()
            if frame.get("type") == kind:
                return frame

    @defer.inlineCallbacks
    def subscribe(self, pattern):
        yield self.send_json({"type": "subscribe", "subject": pattern})
        ack = yield self.recv_json()
        assert ack == {"type": "subscribed", "subject": pattern}, ack
        return ack

    def close(self, code=1000):
        return as_deferred(self.conn.close(code))

    @defer.inlineCallbacks
    def wait_closed(self):
        """Wait for the server to close; return (code, reason)."""
        yield as_deferred(self.conn.wait_closed())
        code = self.conn.close_code
        return (code if code is not None else 1006, self.conn.close_reason or "")


class _AutobahnClientProtocol(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.inbox.put(payload)

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"handshake failed: {code} {reason}"))
        self.factory.closed.callback((code, reason))


class AutobahnPeer:
    """A client built on Autobahn's own client protocol."""

    def __init__(self, protocol, factory):
        self.protocol = protocol
        self.factory = factory
        self.welcome = None

    @classmethod
    @defer.inlineCallbacks
    def connect(cls, url, subprotocols=("wsprovider.v1.json",), expect_welcome=True):
        factory = WebSocketClientFactory(url, protocols=list(subprotocols) if subprotocols else None)
        factory.protocol = _AutobahnClientProtocol
        factory.opened = defer.Deferred()
        factory.closed = defer.Deferred()
        factory.inbox = defer.DeferredQueue()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", factory.port)
        yield endpoint.connect(factory)
        protocol = yield factory.opened
        peer = cls(protocol, factory)
        if expect_welcome:
            peer.welcome = yield peer.recv_json()
        return peer

    @property
    def address(self):
        return self.welcome["reply_to"]

    @property
    def session_id(self):
        return self.welcome["session_id"]

    def send(self, data, binary=False):
        if isinstance(data, str):
            data = data.encode()
        self.protocol.sendMessage(data, binary)

    def send_json(self, obj):
        self.send(json.dumps(obj))

    def recv(self):
        return self.factory.inbox.get()

    @defer.inlineCallbacks
    def recv_json(self):
        data = yield self.recv()
        return json.loads(data)

    @defer.inlineCallbacks
    def subscribe(self, pattern):
        self.send_json({"type": "subscribe", "subject": pattern})
        ack = yield self.recv_json()
        assert ack == {"type": "subscribed", "subject": pattern}, ack
        return ack

    def close(self, code=1000):
        self.protocol.sendClose(code)
        return self.factory.closed
