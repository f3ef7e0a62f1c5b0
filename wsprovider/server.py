"""Server mode: the Autobahn protocol and factory that turn WebSocket peers into sessions.

Each connection is a session with an unguessable id and an address on the lattice
(``<prefix>.session.<id>``, plus ``<prefix>.session.<id>.>`` for the peer's own reply
subjects). Frames flow one way: frame -> envelope -> ``BrokerMessage`` -> lattice, and
back. The factory is the session registry and the ``IMessagingConsumer`` toward peers.

Outbound flow control: the session registers as the transport's push producer. While the
transport's own buffer is full, frames wait in a per-session queue bounded in bytes;
past the bound the peer is a slow consumer and is closed with ``CLOSE_SLOW_CONSUMER``
so that one stalled reader cannot eat the process's memory.
"""

from __future__ import annotations

import collections
import secrets
import time

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from . import envelope
from ._fastframes import FastFramesMixin
from .auth import Authenticator, AuthError
from .interfaces import IMessagingConsumer, IPushProducer, ISessionRegistry, ISubscription
from .message import BrokerMessage, MessagingError, NotConnected, PermissionDenied
from .ratelimit import SessionRateLimiter
from .subjects import matches

CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SLOW_CONSUMER = 4008

# Our own events; Autobahn's ``self.log`` stays Autobahn's (txaio filters its debug noise).
_log = Logger(namespace="wsprovider.server")

# How many reply subjects a session may owe answers to at once (NATS "allow_responses").
_MAX_OWED_REPLIES = 1024


class SessionStats:
    """Counters shared by the sessions of one factory (exported as metrics later)."""

    __slots__ = ("messages_in", "messages_out", "bytes_in", "bytes_out", "errors",
                 "slow_consumer_closes", "sessions_opened", "sessions_closed",
                 "rate_limited", "rate_limit_closes", "refusals", "auth_refusals")

    def __init__(self):
        self.messages_in = self.messages_out = self.bytes_in = self.bytes_out = 0
        self.errors = collections.Counter()
        self.slow_consumer_closes = 0
        self.sessions_opened = self.sessions_closed = 0
        self.rate_limited = self.rate_limit_closes = 0
        self.refusals = collections.Counter()       # refused handshakes by kind (auth, origin, ...)
        self.auth_refusals = collections.Counter()  # refused credentials by reason (missing, expired, ...)


def _close_reason(reason: str) -> bytes:
    """UTF-8, cut to the 123 bytes a close frame allows, never mid-character."""
    data = reason.encode("utf-8")
    if len(data) <= 123:
        return data
    return data[:123].decode("utf-8", "ignore").encode("utf-8")


@implementer(IPushProducer)
class MessagingServerProtocol(FastFramesMixin, WebSocketServerProtocol):
    """One WebSocket peer: a session."""

    session_id = None
    address = None
    codec = envelope.DEFAULT_CODEC
    subprotocol = None
    connected_at = None
    _open = False
    identity = None           # auth.Identity when the service requires credentials
    _limiter = None           # ratelimit.SessionRateLimiter when rate limits are on
    _inflight = 0             # the peer's request frames not answered yet
    _counted = False          # counts toward MAX_CONNECTIONS
    _refusal = None           # why the handshake is being refused (metrics)
    _expiry_call = None
    _cleaned_up = False       # onClose released the session's subscriptions and owed replies

    # -- handshake ----------------------------------------------------------------------

    def onConnect(self, request):
        factory = self.factory
        self.publish_permissions = factory.publish_permissions
        self.subscribe_permissions = factory.subscribe_permissions
        if factory.draining:
            self._refusal = "draining"
            raise ConnectionDeny(503, "the service is shutting down; connect again (to another instance)")
        limit = factory.config.max_connections
        if limit and factory.connection_count >= limit:
            self._refusal = "max_connections"
            raise ConnectionDeny(503, f"too many connections: this server accepts {limit} sessions "
                                      "(MAX_CONNECTIONS); retry later")
        if factory.authenticator is not None:
            try:
                identity = factory.authenticator.authenticate(request.headers, request.params)
            except AuthError as e:
                factory.stats.auth_refusals[e.reason] += 1
                self._refusal = "auth"
                _log.info("refused a session from {peer}: {why}", peer=request.peer, why=str(e))
                raise ConnectionDeny(401, str(e)) from None
            self.identity = identity
            if identity.publish is not None:
                self.publish_permissions = identity.publish
            if identity.subscribe is not None:
                self.subscribe_permissions = identity.subscribe
        offered = request.protocols
        chosen = None
        if offered:
            for p in offered:
                if p in envelope.CODECS:
                    chosen = p
                    break
            if chosen is None:
                self._refusal = "subprotocol"
                raise ConnectionDeny(
                    ConnectionDeny.BAD_REQUEST,
                    "unsupported subprotocol; this server speaks " + ", ".join(envelope.SUBPROTOCOLS))
        self.subprotocol = chosen or envelope.JSON_PROTOCOL
        self.codec = envelope.CODECS[self.subprotocol]
        self.peer_description = request.peer
        factory.connection_count += 1
        self._counted = True
        return chosen

    def failHandshake(self, reason, code=400, responseHeaders=None):
        kind = self._refusal
        if kind is None:
            if reason.startswith("WebSocket connection denied: origin"):
                kind, code = "origin", 403
                reason += ("; allow it with ALLOW_NULL_ORIGIN=true (--allow-null-origin=true)"
                           if "origin 'null'" in reason else
                           "; allow it by adding it to ALLOWED_ORIGINS (--allowed-origins)")
            else:
                kind = "bad_request"
        self.factory.stats.refusals[kind] += 1
        if responseHeaders is None:
            if code == 401:
                responseHeaders = [("WWW-Authenticate", 'Bearer realm="wsprovider"')]
            elif code == 503:
                responseHeaders = [("Retry-After", "5")]
        WebSocketServerProtocol.failHandshake(self, reason, code, responseHeaders)

    def onOpen(self):
        factory = self.factory
        self.session_id = secrets.token_urlsafe(16)
        self.address = f"{factory.session_prefix}{self.session_id}"
        self.connected_at = time.time()
        self._subs = {}
        self._sub_waiters = {}  # pattern -> frame ids to acknowledge once the subscription is live
        self._owed = {}
        self._queue = None
        self._queued_bytes = 0
        self._paused = False
        self._open = True
        self._binary = self.codec.is_binary
        if factory.rate_limited:
            self._limiter = SessionRateLimiter.from_config(factory.config)
        identity = self.identity
        if identity is not None and identity.expires_at is not None:
            self._expiry_call = factory.reactor.callLater(
                max(0.0, identity.expires_at - time.time()), self._credentials_expired)
        # Under twisted.web the HTTP channel is still the transport's producer; we take over.
        try:
            self.transport.unregisterProducer()
        except Exception:
            pass
        self.transport.registerProducer(self, True)
        factory._session_opened(self)
        pending = [
            factory.lattice.subscribe(self.address, self.deliver, on_status=self._bus_status),
            factory.lattice.subscribe(self.address + ".>", self.deliver, on_status=self._bus_status),
        ]
        if all(d.called and not d.paused and ISubscription.providedBy(d.result) for d in pending):
            self._addressable([d.result for d in pending])  # the local lattice: no DeferredList
        else:
            d = defer.gatherResults(pending, consumeErrors=True)
            d.addCallbacks(self._addressable, self._not_addressable)
        if factory.draining:
            self.close_session(CLOSE_GOING_AWAY, "the service is shutting down")

    def _bus_status(self, error):
        """A bus status on this session's address (NATS no responders): an error frame, never data."""
        if self._open:
            self.send_error(error.code, str(error))

    def _credentials_expired(self):
        self._expiry_call = None
        self.close_session(CLOSE_POLICY, "credentials expired; reconnect with a fresh token")

    def _addressable(self, subs):
        if not self._open:
            for s in subs:
                s.unsubscribe()
            return
        self._address_subs = subs
        self.send_payload(self.codec.control(
            "welcome", session_id=self.session_id, reply_to=self.address,
            protocol=self.subprotocol, max_message_size=self.factory.config.max_message_size))

    def _not_addressable(self, failure):
        _log.error("session {id}: could not subscribe its address: {err}",
                       id=self.session_id, err=failure.getErrorMessage())
        self.close_session(1011, "the service cannot route messages to this session right now; retry later")

    # -- inbound ------------------------------------------------------------------------

    def onMessage(self, payload, isBinary):
        factory = self.factory
        stats = factory.stats
        stats.messages_in += 1
        stats.bytes_in += len(payload)
        limiter = self._limiter
        if limiter is not None and not limiter.allow(len(payload)):
            self._rate_limited(limiter)
            return
        try:
            frame = self.codec.decode(payload, isBinary)
        except envelope.FrameError as e:
            self.send_error(e.code, str(e), e.frame_id)
            return
        kind = frame.kind
        if kind == envelope.MESSAGE:
            self._publish(frame)
        elif kind == envelope.REQUEST:
            self._request(frame)
        elif kind == envelope.SUBSCRIBE:
            self._subscribe(frame)
        elif kind == envelope.UNSUBSCRIBE:
            self._unsubscribe(frame)
        else:
            self.send_payload(self.codec.control("pong", id=frame.frame_id))

    def _rate_limited(self, limiter):
        if self.state != self.STATE_OPEN:
            return
        stats = self.factory.stats
        stats.rate_limited += 1
        if limiter.violation():
            stats.rate_limit_closes += 1
            _log.warn("session {id} ({peer}) keeps exceeding its rate limit; closing it",
                      id=self.session_id, peer=self.peer)
            self.close_session(CLOSE_POLICY, "rate limit exceeded repeatedly")
            return
        config = self.factory.config
        self.send_error("rate_limited", "rate limit exceeded (RATE_LIMIT_MSGS_PER_SEC="
                        f"{config.rate_limit_msgs_per_sec:g}, RATE_LIMIT_BYTES_PER_SEC="
                        f"{config.rate_limit_bytes_per_sec:g}); the message was dropped")

    def _checked(self, frame):
        """Return the message to put on the lattice, or None after answering with an error."""
        msg = frame.message
        subject = msg.subject
        owed = bool(self._owed) and subject in self._owed
        if not owed:
            rule = self.publish_permissions.check_publish(subject)
            if rule is not None:
                self.send_error(PermissionDenied.code, f"publish to {subject!r} is not allowed ({rule})",
                                frame.frame_id)
                return None
        reply_to = msg.reply_to
        if reply_to is None:
            if frame.kind == envelope.MESSAGE:
                msg.reply_to = self.address
        elif not (reply_to == self.address or reply_to.startswith(self.address + ".")):
            rule = self.publish_permissions.check_publish(reply_to)
            if rule is not None:
                self.send_error(PermissionDenied.code,
                                f"reply_to {reply_to!r} is not allowed ({rule}); use your own address "
                                f"{self.address!r} or a subject below it", frame.frame_id)
                return None
        if owed:
            del self._owed[subject]  # one response per reply subject, as NATS allow_responses
        return msg

    def _publish(self, frame):
        msg = self._checked(frame)
        if msg is None:
            return
        lattice = self.factory.lattice
        dispatch = getattr(lattice, "dispatch", None)  # LocalLattice: None when delivered synchronously
        d = dispatch(msg) if dispatch is not None else lattice.publish(msg)
        if d is None or (d.called and d.result is None):
            return  # fast path: delivered synchronously
        d.addErrback(self._publish_failed, frame.frame_id, msg.subject)

    def _publish_failed(self, failure, frame_id, subject):
        err = failure.value
        if isinstance(err, MessagingError):
            self.send_error(err.code, str(err), frame_id)
        else:
            _log.failure("publishing to {subject} failed", failure, subject=subject)
            self.send_error("internal_error", f"publishing to {subject!r} failed inside the service", frame_id)

    def _request(self, frame):
        factory = self.factory
        if factory.draining:
            self.send_error("going_away", "the service is shutting down; send the request again after "
                            "reconnecting", frame.frame_id)
            return
        msg = self._checked(frame)
        if msg is None:
            return
        config = factory.config
        timeout = min(frame.timeout_ms or config.request_timeout_ms, config.max_request_timeout_ms)
        factory.inflight += 1
        self._inflight += 1
        started = time.monotonic()
        d = factory.lattice.request(msg.subject, msg.body, timeout)
        frame_id = frame.frame_id
        d.addCallbacks(self._replied, self._publish_failed, callbackArgs=(frame_id,),
                       errbackArgs=(frame_id, msg.subject))
        d.addBoth(self._request_done, started)

    def _request_done(self, result, started):
        self._inflight -= 1
        factory = self.factory
        histogram = factory.request_latency
        if histogram is not None:
            histogram.observe(time.monotonic() - started)
        if factory.draining and not self._inflight and self.state == self.STATE_OPEN:
            self.close_session(CLOSE_GOING_AWAY, "the service is shutting down")
        factory._request_finished()
        return None

    def _replied(self, reply, frame_id):
        if self._open:
            payload = self.codec.message(reply, kind="reply", frame_id=frame_id)
            if len(payload) > self.maxMessagePayloadSize > 0:
                err = self._too_large(reply, len(payload))
                self.send_error(err.code, str(err), frame_id)
                return
            self.send_payload(payload)

    def _subscribe(self, frame):
        pattern = frame.subject
        if pattern in self._subs:
            waiting = self._sub_waiters.get(pattern)
            if waiting is not None:  # still being subscribed: acknowledge once it is live
                waiting.append(frame.frame_id)
            else:
                self.send_payload(self.codec.control("subscribed", subject=pattern, id=frame.frame_id))
            return
        rule = self.subscribe_permissions.check_subscribe(pattern)
        if rule is not None:
            self.send_error(PermissionDenied.code, f"subscribe to {pattern!r} is not allowed ({rule})",
                            frame.frame_id)
            return
        if len(self._subs) >= self.factory.config.max_subscriptions:
            self.send_error("too_many_subscriptions",
                            f"this session already holds {len(self._subs)} subscriptions (MAX_SUBSCRIPTIONS); "
                            "unsubscribe from one first", frame.frame_id)
            return
        self._subs[pattern] = None  # reserved while the lattice subscribes
        waiting = self._sub_waiters[pattern] = [frame.frame_id]
        d = self.factory.lattice.subscribe(pattern, self.deliver, frame.queue)

        def done(sub):
            current = self._sub_waiters.get(pattern) is waiting
            if current:
                del self._sub_waiters[pattern]
            if not self._open or not current:
                sub.unsubscribe()  # closed, or unsubscribed (and maybe subscribed anew) meanwhile
                return
            self._subs[pattern] = sub
            for frame_id in waiting:
                self.send_payload(self.codec.control("subscribed", subject=pattern, id=frame_id))

        def failed(failure):
            if self._sub_waiters.get(pattern) is waiting:
                del self._sub_waiters[pattern]
            self._subs.pop(pattern, None)
            for frame_id in waiting:
                self._publish_failed(failure, frame_id, pattern)

        d.addCallbacks(done, failed)

    def _unsubscribe(self, frame):
        pattern = frame.subject
        if pattern not in self._subs:
            self.send_error("not_subscribed", f"this session has no subscription to {pattern!r}", frame.frame_id)
            return
        sub = self._subs.pop(pattern)
        self._sub_waiters.pop(pattern, None)  # a subscription still on its way is dropped when it lands
        if sub is not None:
            sub.unsubscribe()
        self.send_payload(self.codec.control("unsubscribed", subject=pattern, id=frame.frame_id))

    # -- outbound -----------------------------------------------------------------------

    def deliver(self, msg: BrokerMessage):
        """Lattice callback: a message for this session."""
        if not self._open or self.state != self.STATE_OPEN:  # closed, or our close frame is out
            raise NotConnected(f"session {self.session_id} is closed")
        payload = self.codec.message(msg)
        if len(payload) > self.maxMessagePayloadSize > 0:
            raise self._too_large(msg, len(payload))
        reply_to = msg.reply_to
        if reply_to is not None and not reply_to.startswith(self.address):
            owed = self._owed
            if len(owed) >= _MAX_OWED_REPLIES:
                self._trim_owed()
            owed[reply_to] = time.monotonic() + self.factory.config.max_request_timeout_ms / 1000.0
        self.send_payload(payload)

    def _too_large(self, msg, size) -> MessagingError:
        # The limit is symmetric (as NATS' max_payload): the peer announced it in welcome.
        self.factory.stats.errors["too_large"] += 1
        return MessagingError(
            f"message to {msg.subject!r} is {size} bytes framed, larger than session {self.session_id}'s "
            f"limit of {self.maxMessagePayloadSize} bytes (MAX_MESSAGE_SIZE); it was not delivered",
            code="too_large")

    def _trim_owed(self):
        now = time.monotonic()
        owed = self._owed
        for key in [k for k, deadline in owed.items() if deadline < now]:
            del owed[key]
        while len(owed) >= _MAX_OWED_REPLIES:
            del owed[next(iter(owed))]

    def send_error(self, code, message, frame_id=None):
        self.factory.stats.errors[code] += 1
        self.send_payload(self.codec.error(code, message, frame_id))

    def send_payload(self, payload: bytes) -> bool:
        """Send one encoded frame, or queue it while the transport is full."""
        if not self._open or self.state != self.STATE_OPEN:  # no data frame after a close frame
            return False
        stats = self.factory.stats
        stats.messages_out += 1
        stats.bytes_out += len(payload)
        if self._queue is None:
            self.send_message_fast(payload, self._binary)
            return True
        return self._enqueue(payload, len(payload))

    def send_prepared(self, prepared, size: int) -> bool:
        if not self._open or self.state != self.STATE_OPEN:
            return False
        stats = self.factory.stats
        stats.messages_out += 1
        stats.bytes_out += size
        if self._queue is None:
            self.sendPreparedMessage(prepared)
            return True
        return self._enqueue(prepared, size)

    def _enqueue(self, item, size):
        self._queue.append((item, size))
        self._queued_bytes += size
        if self._queued_bytes > self.factory.config.outbound_buffer_bytes:
            self._slow_consumer()
            return False
        return True

    def _slow_consumer(self):
        self.factory.stats.slow_consumer_closes += 1
        queued = self._queued_bytes
        _log.warn("session {id} ({peer}) is a slow consumer: {queued} bytes waiting; closing it",
                      id=self.session_id, peer=self.peer, queued=queued)
        self._queue = collections.deque()
        self._queued_bytes = 0
        self._open = False
        self.close_session(CLOSE_SLOW_CONSUMER,
                           f"slow consumer: more than {self.factory.config.outbound_buffer_bytes} bytes waiting")
        # A reader that has stopped may never read the close frame either.
        self._abort_call = self.factory.reactor.callLater(self.factory.config.ping_timeout_sec, self._abort_if_open)

    _abort_call = None

    def _abort_if_open(self):
        self._abort_call = None
        if self.transport is not None and self.state != self.STATE_CLOSED:
            self.dropConnection(abort=True)

    # IPushProducer: called by the transport.
    def pauseProducing(self):
        if self._queue is None:
            self._queue = collections.deque()

    def resumeProducing(self):
        queue = self._queue
        self._queue = None
        if not queue or not self._open or self.state != self.STATE_OPEN:
            self._queued_bytes = 0
            return
        binary = self._binary
        queued = self._queued_bytes
        while queue:
            item, size = queue.popleft()
            queued -= size
            if type(item) is bytes:
                self.sendMessage(item, binary)
            else:
                self.sendPreparedMessage(item)
            if self._queue is not None:  # paused again while writing
                self._queue.extend(queue)
                self._queued_bytes = queued
                return
        self._queued_bytes = 0

    def stopProducing(self):
        self._queue = None

    # -- closing ------------------------------------------------------------------------

    def close_session(self, code: int, reason: str) -> None:
        """Close with any RFC 6455 code (Autobahn's ``sendClose`` only takes 1000 and 3000-4999)."""
        if self.state == self.STATE_OPEN:
            if code == 1000 or 3000 <= code <= 4999:
                self.sendClose(code, reason)
            else:
                self.sendCloseFrame(code, _close_reason(reason), False)
        elif self.state != self.STATE_CLOSED and self.transport is not None:
            self.dropConnection(abort=True)

    def onClose(self, wasClean, code, reason):
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        if self._expiry_call is not None and self._expiry_call.active():
            self._expiry_call.cancel()
        if self._counted:
            self._counted = False
            self.factory.connection_count -= 1
        if getattr(self, "closedByMe", False) and getattr(self, "localCloseCode", None):
            code = self.localCloseCode  # report why *we* closed, not the peer's echo
            reason = (self.localCloseReason or b"").decode("utf-8", "replace")
        was_open = self.session_id is not None and self.connected_at is not None and not self._cleaned_up
        self._open = False
        if not was_open:
            return
        self._cleaned_up = True
        factory = self.factory
        for sub in getattr(self, "_address_subs", ()):
            sub.unsubscribe()
        for sub in self._subs.values():
            if sub is not None:
                sub.unsubscribe()
        self._subs.clear()
        self._queue = None
        owed, self._owed = self._owed, {}
        fail_reply = getattr(factory.lattice, "fail_reply", None)
        if fail_reply is not None:
            for reply_to in owed:
                fail_reply(reply_to, NotConnected(
                    f"session {self.session_id} disconnected before replying (close code {code})"))
        factory._session_closed(self, code, reason)

    def describe(self) -> dict:
        return {
            "session_id": self.session_id,
            "address": self.address,
            "connected_at": self.connected_at,
            "peer": self.peer,
            "subprotocol": self.subprotocol,
            "subscriptions": sorted(p for p in self._subs),
            "mode": "server",
            "principal": self.identity.principal if self.identity is not None else None,
        }


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
    """Accepts WebSocket peers as sessions and connects them to a lattice.

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
        self.stats = SessionStats()
        self.sessions: dict[str, MessagingServerProtocol] = {}
        self.session_prefix = f"{config.subject_prefix}.session."
        self.broadcast_prefix = f"{config.subject_prefix}.broadcast."
        self.publish_permissions = config.publish_permissions()
        self.subscribe_permissions = config.subscribe_permissions()
        self.authenticator = Authenticator.from_config(config)
        self.rate_limited = bool(config.rate_limit_msgs_per_sec or config.rate_limit_bytes_per_sec)
        self.connection_count = 0   # sessions past onConnect, not closed yet (MAX_CONNECTIONS)
        self.inflight = 0           # peers' requests not answered yet (drain)
        self.draining = False
        self.request_latency = None  # a prometheus Histogram, set by wsprovider.metrics
        self._inflight_waiters = []
        self._broadcast_sub = None
        self._observers = []
        self.setProtocolOptions(
            maxMessagePayloadSize=config.max_message_size,
            maxFramePayloadSize=config.max_message_size,
            autoPingInterval=config.ping_interval_sec or None,
            autoPingTimeout=config.ping_timeout_sec if config.ping_interval_sec else None,
            openHandshakeTimeout=10,
            failByDrop=False,  # protocol violations (e.g. too big) get a close frame with the reason
            closeHandshakeTimeout=2,
            perMessageCompressionAccept=(deflate_accept(config.compression_window_bits, config.max_message_size)
                                         if config.compression else _refuse_compression),
            allowedOrigins=origin_patterns(config.allowed_origins) or ["*"],
            allowNullOrigin=config.allow_null_origin,
        )
        # Autobahn logs every frame at debug level and tracks timings unless told not to.
        self.trackTimings = False

    # -- lifecycle ----------------------------------------------------------------------

    def start(self):
        """Subscribe to the broadcast subjects. Deferred."""
        d = self.lattice.subscribe(self.broadcast_prefix + ">", self._broadcast_from_lattice)

        def keep(sub):
            self._broadcast_sub = sub
        return d.addCallback(keep)

    def stop(self, code=CLOSE_GOING_AWAY, reason="the service is shutting down"):
        """Close every session. Deferred firing when they are gone (bounded by the close handshake)."""
        if self._broadcast_sub is not None:
            self._broadcast_sub.unsubscribe()
            self._broadcast_sub = None
        waits = []
        for session in list(self.sessions.values()):
            d = defer.Deferred()
            session.is_closed.addBoth(lambda _, d=d: d.callback(None))
            if session.state != session.STATE_CLOSING:  # already closing: wait for its handshake
                session.close_session(code, reason)
            waits.append(d)
        return defer.DeferredList(waits).addCallback(self._cancel_leftover_timers)

    def drain(self, timeout: float, code=CLOSE_GOING_AWAY, reason="the service is shutting down"):
        """Graceful shutdown: refuse new sessions, close idle sessions now, let the peers' in-flight
        requests finish for up to ``timeout`` seconds (their sessions close once answered), then
        close whatever is left. Deferred firing when every session is gone."""
        self.draining = True
        for session in list(self.sessions.values()):
            if not session._inflight:
                session.close_session(code, reason)
        if not self.inflight:
            return self.stop(code, reason)
        _log.info("draining: waiting up to {timeout}s for {n} in-flight requests", timeout=timeout,
                  n=self.inflight)
        waiter = defer.Deferred()
        self._inflight_waiters.append(waiter)

        def expired():
            if not waiter.called:
                _log.warn("drain timeout: closing sessions with {n} requests still in flight", n=self.inflight)
                waiter.callback(None)

        timer = self.reactor.callLater(timeout, expired)
        waiter.addCallback(lambda _: timer.cancel() if timer.active() else None)
        return waiter.addCallback(lambda _: self.stop(code, reason))

    def _request_finished(self):
        self.inflight -= 1
        if not self.inflight and self._inflight_waiters:
            waiters, self._inflight_waiters = self._inflight_waiters, []
            for w in waiters:
                if not w.called:
                    w.callback(None)

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
        """``observer.session_opened(session)`` / ``session_closed(session, code, reason)``."""
        self._observers.append(observer)

    def _session_opened(self, session):
        self.stats.sessions_opened += 1
        if self.config.enable_session_tracking:
            self.sessions[session.session_id] = session
        _log.info("session {id} opened from {peer} ({proto})", id=session.session_id,
                      peer=session.peer, proto=session.subprotocol)
        for o in self._observers:
            o.session_opened(session)

    def _session_closed(self, session, code, reason):
        self.stats.sessions_closed += 1
        self.sessions.pop(session.session_id, None)
        _log.info("session {id} closed (code {code}: {reason})", id=session.session_id,
                      code=code, reason=reason or "")
        for o in self._observers:
            o.session_closed(session, code, reason)

    # -- IMessagingConsumer -------------------------------------------------------------

    def publish(self, msg):
        return self.lattice.publish(msg)

    def request(self, subject, body, timeout_ms):
        return self.lattice.request(subject, body, timeout_ms)

    # -- ISessionRegistry ---------------------------------------------------------------

    def list_sessions(self):
        return [s.describe() for s in self.sessions.values()]

    def session_address(self, session_id: str) -> str:
        return self.session_prefix + session_id

    def send_to_session(self, session_id, msg):
        session = self.sessions.get(session_id)
        if session is not None:
            try:
                session.deliver(msg)
            except MessagingError as e:
                return defer.fail(e)
            return defer.succeed(None)
        # Not here: it may be connected to another instance on the same lattice.
        address = self.session_address(session_id)
        to_address = getattr(self.lattice, "publish_to_address", None)
        if to_address is not None:  # NATS: keeps msg's subject, acknowledged by the session's instance
            d = to_address(address, msg, self.config.request_timeout_ms)
        else:
            d = self.lattice.publish(msg.replace(subject=address) if msg.subject != address else msg)
        return d.addErrback(self._no_such_session, session_id)

    @staticmethod
    def _no_such_session(failure, session_id):
        failure.trap(MessagingError)
        raise NotConnected(f"no session {session_id!r} is connected") from None

    def broadcast(self, msg):
        """Send ``msg`` to every session on every instance sharing the lattice.

        Returns a Deferred firing with the number of sessions reached on this instance.
        """
        d = self.lattice.publish(msg.replace(subject=self.broadcast_prefix + msg.subject))
        return d.addCallback(lambda _: self._last_broadcast_count)

    _last_broadcast_count = 0

    def _broadcast_from_lattice(self, msg):
        self._last_broadcast_count = self.broadcast_local(
            msg.replace(subject=msg.subject[len(self.broadcast_prefix):]))

    def broadcast_local(self, msg) -> int:
        """Frame ``msg`` once per codec and send it to every session here."""
        prepared = {}
        count = 0
        for session in list(self.sessions.values()):
            codec = session.codec
            entry = prepared.get(codec.name)
            if entry is None:
                payload = codec.message(msg)
                if len(payload) > self.maxMessagePayloadSize > 0:
                    self.stats.errors["too_large"] += 1
                    _log.warn("broadcast on {subject} dropped: {size} bytes framed exceeds MAX_MESSAGE_SIZE "
                              "({limit})", subject=msg.subject, size=len(payload), limit=self.maxMessagePayloadSize)
                    return 0
                entry = prepared[codec.name] = (self.prepareMessage(payload, codec.is_binary), len(payload))
            if session.send_prepared(*entry):
                count += 1
        return count

    def disconnect(self, session_id, code=1000, reason="closed by the service"):
        session = self.sessions.get(session_id)
        if session is None:
            return defer.succeed(False)
        session.close_session(code, reason)
        return defer.succeed(True)
