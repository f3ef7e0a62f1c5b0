"""Server mode: the thin Autobahn adapter between WebSocket peers and the session core.

Every decision about a session (admission, permissions, owed replies, subscriptions,
requests in flight, rate limits, the outbound budget) lives in ``wsprovider.session``,
which has no network code. This module only carries frames: the opening handshake is
turned into ``SessionHub.admit``, each message into ``Session.received``, each ping into
``Session.pinged``, and the transport's push-producer calls into
``Session.transport_paused`` / ``transport_resumed``. ``MessagingServerProtocol`` is the
``ISessionTransport`` the core writes through.

``MessagingServerFactory`` is Autobahn's factory; the registry, drain and broadcast are
its ``SessionHub``'s (``factory.hub``), reachable on the factory by delegation so that
existing callers (provider, web, cluster directory) keep working.
"""

from __future__ import annotations

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger
from zope.interface import implementer

from . import envelope
from ._fastframes import FastFramesMixin
from .auth import Authenticator
from .interfaces import IMessagingConsumer, IPushProducer, ISessionRegistry
from .session import (CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_SLOW_CONSUMER, CLOSE_TOO_BIG,  # noqa: F401
                      ISessionTransport, Refused, SessionHub, SessionStats)

__all__ = ["MessagingServerProtocol", "MessagingServerFactory", "SessionStats", "CLOSE_GOING_AWAY",
           "CLOSE_POLICY", "CLOSE_TOO_BIG", "CLOSE_SLOW_CONSUMER", "deflate_accept", "origin_patterns"]

_log = Logger(namespace="wsprovider.server")


def _close_reason(reason: str) -> bytes:
    """UTF-8, cut to the 123 bytes a close frame allows, never mid-character."""
    data = reason.encode("utf-8", "replace")
    if len(data) <= 123:
        return data
    return data[:123].decode("utf-8", "ignore").encode("utf-8")


@implementer(IPushProducer, ISessionTransport)
class MessagingServerProtocol(FastFramesMixin, WebSocketServerProtocol):
    """One WebSocket peer, carried for its ``Session``."""

    session = None
    _admission = None
    _refusal = None           # why the handshake is being refused (metrics), "counted" if counted
    _fragments = 0            # frames of the message being reassembled

    # -- handshake ----------------------------------------------------------------------

    def connectionMade(self):
        guard = self.factory.handshake_guard
        if guard is not None:
            guard.upgraded(self.transport)  # out of the HTTP phase: Autobahn's timeout from here
        super().connectionMade()

    def onConnect(self, request):
        hub = self.factory.hub
        try:
            admission = hub.admit(request.headers, request.params, request.protocols)
        except Refused as e:
            self._refusal = "counted"
            raise ConnectionDeny(e.status, str(e)) from None
        self._admission = admission
        self.peer_description = request.peer
        return admission.subprotocol

    def failHandshake(self, reason, code=400, responseHeaders=None):
        if self._refusal is None:
            kind = "bad_request"
            if reason.startswith("WebSocket connection denied: origin"):
                kind, code = "origin", 403
                reason += ("; allow it with ALLOW_NULL_ORIGIN=true (--allow-null-origin=true)"
                           if "origin 'null'" in reason else
                           "; allow it by adding it to ALLOWED_ORIGINS (--allowed-origins)")
            self.factory.hub.stats.refusals[kind] += 1
        if responseHeaders is None:
            if code == 401:
                responseHeaders = [("WWW-Authenticate", 'Bearer realm="wsprovider"')]
            elif code == 503:
                responseHeaders = [("Retry-After", "5")]
        WebSocketServerProtocol.failHandshake(self, reason, code, responseHeaders)

    def onOpen(self):
        factory = self.factory
        self._binary = self._admission.codec.is_binary
        # Under twisted.web the HTTP channel is still the transport's producer; we take over.
        try:
            self.transport.unregisterProducer()
        except Exception:
            pass
        self.transport.registerProducer(self, True)
        session = factory.hub.open_session(self, self._admission, self.peer, self.http_headers)
        self.session = session
        self.onMessage = session.received  # the hot path, without a hop through this class
        self.forget_handshake()

    # -- inbound ------------------------------------------------------------------------

    def onMessage(self, payload, isBinary):
        pass  # before onOpen (never, in practice); replaced by the session's in onOpen

    def onPing(self, payload):
        if self.session is not None:
            self.session.pinged(payload)

    def onMessageBegin(self, isBinary):
        self._fragments = 0
        WebSocketServerProtocol.onMessageBegin(self, isBinary)

    def onMessageFrameBegin(self, length):
        self._fragments += 1
        limit = self.factory.config.max_fragments_per_message
        if limit and self._fragments > limit and not self.failedByMe:
            self.factory.hub.stats.fragment_closes += 1
            self._fail_connection(CLOSE_POLICY, f"more than {limit} fragments in one message "
                                                "(MAX_FRAGMENTS_PER_MESSAGE)")
            return
        WebSocketServerProtocol.onMessageFrameBegin(self, length)

    # -- ISessionTransport ----------------------------------------------------------------

    def send_payload(self, payload):
        self.send_message_fast(payload, self._binary)

    def send_prepared(self, prepared):
        self.sendPreparedMessage(prepared)

    def send_control(self, kind, payload):
        if self.state == self.STATE_OPEN:
            self.sendPong(payload)

    def close(self, code, reason, grace=None):
        """Close with any RFC 6455 code (Autobahn's ``sendClose`` only takes 1000 and 3000-4999)."""
        if self.state == self.STATE_OPEN:
            if grace is not None:
                self.closeHandshakeTimeout = grace
            if code == 1000 or 3000 <= code <= 4999:
                self.sendClose(code, reason)
            else:
                self.sendCloseFrame(code, _close_reason(reason), False)
        elif self.state == self.STATE_CONNECTING and self.transport is not None:
            self.abort()
        # CLOSING: a close handshake is under way, bounded by its own timeout.

    def abort(self):
        if self.transport is not None and self.state != self.STATE_CLOSED:
            self.dropConnection(abort=True)

    def pause_reading(self):
        self.transport.pauseProducing()

    def resume_reading(self):
        self.transport.resumeProducing()

    close_session = close  # the seed-era name

    # -- IPushProducer: called by the transport -----------------------------------------

    def pauseProducing(self):
        if self.session is not None:
            self.session.transport_paused()

    def resumeProducing(self):
        if self.session is not None:
            self.session.transport_resumed()

    def stopProducing(self):
        pass

    # -- closing ------------------------------------------------------------------------

    def onClose(self, wasClean, code, reason):
        if self._admission is not None:
            admission, self._admission = self._admission, None
            self.factory.hub.release(admission)
        if getattr(self, "closedByMe", False) and getattr(self, "localCloseCode", None):
            code = self.localCloseCode  # report why *we* closed, not the peer's echo
            reason = (self.localCloseReason or b"").decode("utf-8", "replace")
        session = self.session
        if session is not None:
            session.closed(code, reason)

    # -- what observers and the admin listing read ----------------------------------------

    def describe(self) -> dict:
        return self.session.describe() if self.session is not None else {}


def _refuse_compression(offers):
    return None


def deflate_accept(window_bits: int, max_message_size: int):
    """A ``perMessageCompressionAccept`` for permessage-deflate that bounds memory per session.

    The server never takes context over between messages and compresses with a
    ``2**window_bits`` window; it says so in its response (RFC 7692 lets a server add
    ``server_no_context_takeover`` and ``server_max_window_bits`` unasked) so the peer
    can free its own window. It asks the peer for the same (``client_no_context_takeover``,
    ``client_max_window_bits``) when the peer's offer allows it. Decompressed messages
    are bounded by ``MAX_MESSAGE_SIZE``.
    """
    from autobahn.websocket.compress import PerMessageDeflateOffer, PerMessageDeflateOfferAccept

    mem_level = max(1, min(8, window_bits - 6))

    class BoundedDeflateAccept(PerMessageDeflateOfferAccept):
        def get_extension_string(self):
            text = PerMessageDeflateOfferAccept.get_extension_string(self)
            if not self.offer.request_no_context_takeover:
                text += "; server_no_context_takeover"
            if not self.offer.request_max_window_bits:
                text += f"; server_max_window_bits={self.window_bits}"
            return text

    def accept(offers):
        for offer in offers:
            if isinstance(offer, PerMessageDeflateOffer):
                return BoundedDeflateAccept(
                    offer,
                    request_no_context_takeover=bool(offer.accept_no_context_takeover),
                    request_max_window_bits=window_bits if offer.accept_max_window_bits else 0,
                    no_context_takeover=True,
                    window_bits=min(window_bits, offer.request_max_window_bits or window_bits),
                    mem_level=mem_level,
                    max_message_size=max_message_size)
        return None

    return accept


def origin_patterns(origins) -> list:
    """Autobahn matches ``scheme://host:port``; add the default port where the operator left it out."""
    out = []
    for origin in origins:
        origin = origin.strip().rstrip("/")
        scheme, sep, rest = origin.partition("://")
        if sep and scheme.lower() in ("http", "https") and ":" not in rest.replace("*", ""):
            if rest.endswith("*"):
                out.append(origin)  # https://*  : any host, any port
            else:
                out.append(f"{origin}:{443 if scheme.lower() == 'https' else 80}")
        else:
            out.append(origin)
    return out



@implementer(IMessagingConsumer, ISessionRegistry)
class MessagingServerFactory(WebSocketServerFactory):
    """Accepts WebSocket peers as sessions of a ``SessionHub`` connected to a lattice.

    :param lattice: an ``ILattice`` (the embedded ``LocalLattice``, NATS, ...).
    :param config: a ``ProviderConfig``.
    """

    protocol = MessagingServerProtocol

    def __init__(self, lattice, config, reactor=None, url=None):
        if reactor is None:
            from twisted.internet import reactor
        WebSocketServerFactory.__init__(self, url, protocols=list(envelope.SUBPROTOCOLS), reactor=reactor)
        self.reactor = reactor
        self.lattice = lattice
        self.config = config
        self.hub = SessionHub(lattice, config, reactor, Authenticator.from_config(config),
                              prepare=self.prepareMessage)
        self.handshake_guard = None  # a handshake.HandshakeGuard, set where the site is built
        self.setProtocolOptions(
            maxMessagePayloadSize=config.max_message_size,
            maxFramePayloadSize=config.max_message_size,
            autoPingInterval=config.ping_interval_sec or None,
            autoPingTimeout=config.ping_timeout_sec if config.ping_interval_sec else None,
            openHandshakeTimeout=config.handshake_timeout_sec,
            failByDrop=False,  # protocol violations (e.g. too big) get a close frame with the reason
            closeHandshakeTimeout=2,
            perMessageCompressionAccept=(deflate_accept(config.compression_window_bits, config.max_message_size)
                                         if config.compression else _refuse_compression),
            allowedOrigins=origin_patterns(config.allowed_origins) or ["*"],
            allowNullOrigin=config.allow_null_origin,
        )
        # Autobahn logs every frame at debug level and tracks timings unless told not to.
        self.trackTimings = False

    # -- the hub's, by delegation ---------------------------------------------------------

    stats = property(lambda self: self.hub.stats)
    sessions = property(lambda self: self.hub.sessions)
    draining = property(lambda self: self.hub.draining)
    inflight = property(lambda self: self.hub.inflight)
    connection_count = property(lambda self: self.hub.connection_count)
    session_prefix = property(lambda self: self.hub.session_prefix)
    broadcast_prefix = property(lambda self: self.hub.broadcast_prefix)
    authenticator = property(lambda self: self.hub.authenticator)

    @property
    def request_latency(self):
        return self.hub.request_latency

    @request_latency.setter
    def request_latency(self, histogram):
        self.hub.request_latency = histogram

    def start(self):
        return self.hub.start()

    def stop(self, code=CLOSE_GOING_AWAY, reason="the service is shutting down"):
        return self.hub.stop(code, reason).addCallback(self._cancel_leftover_timers)

    def drain(self, timeout, code=CLOSE_GOING_AWAY, reason="the service is shutting down"):
        return self.hub.drain(timeout, code, reason).addCallback(self._cancel_leftover_timers)

    def _cancel_leftover_timers(self, result):
        # Autobahn's batched timer can keep a bucket for a close-handshake timeout of a
        # connection that is already gone; once every session is closed none is needed.
        timer = getattr(self, "_batched_timer", None)
        buckets = getattr(timer, "_buckets", None)
        if buckets:
            for delayed_call, _ in list(buckets.values()):
                if delayed_call.active():
                    delayed_call.cancel()
            buckets.clear()
        return result

    def add_observer(self, observer):
        self.hub.add_observer(observer)

    def publish(self, msg):
        return self.hub.publish(msg)

    def request(self, subject, body, timeout_ms):
        return self.hub.request(subject, body, timeout_ms)

    def list_sessions(self):
        return self.hub.list_sessions()

    def session_address(self, session_id):
        return self.hub.session_address(session_id)

    def send_to_session(self, session_id, msg):
        return self.hub.send_to_session(session_id, msg)

    def broadcast(self, msg):
        return self.hub.broadcast(msg)

    def broadcast_local(self, msg):
        return self.hub.broadcast_local(msg)

    def disconnect(self, session_id, code=1000, reason="closed by the service"):
        return self.hub.disconnect(session_id, code, reason)
