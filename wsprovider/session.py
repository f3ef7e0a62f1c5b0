"""The sans-IO server session core: every per-session decision, and no network code.

A ``Session`` is one WebSocket peer as the service sees it: its identity and
permissions, the one-time replies it owes, its subscriptions, its requests in flight,
its rate limit and its outbound budget. It talks to the wire only through an
``ISessionTransport`` (the Autobahn adapter in ``server.py``, a memory transport in
tests) and to the rest of the service through its ``SessionHub``: the registry of
sessions, drain and broadcast.

Nothing here imports Autobahn or ``twisted.web``; time comes from an ``IReactorTime``
(a ``task.Clock`` in tests).

Outbound budget: while the transport says it is full (``transport_paused``), frames wait
in a queue bounded in bytes (``OUTBOUND_BUFFER_BYTES``). Every frame counts: data,
errors, acknowledgements and pongs. Past the bound the peer is a slow consumer: the
queue is dropped, a 4008 close frame goes after what the socket already holds, and the
connection is aborted if the peer has not read up to it within ``SLOW_CONSUMER_GRACE_SEC``.
"""

from __future__ import annotations

import collections
import secrets

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface, implementer

from . import envelope
from ._defer import result_if_succeeded
from .interfaces import (IAddressedDelivery, IMessagingConsumer, ISessionRegistry, ISubscription,
                         ISynchronousDispatch)
from .message import BrokerMessage, MessagingError, NotConnected, PermissionDenied
from .ratelimit import SessionRateLimiter
from .replies import OwedReplies, TooManyRequests

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_SLOW_CONSUMER = 4008

# How many reply subjects a session may owe answers to at once (NATS "allow_responses").
MAX_OWED_REPLIES = 1024

_log = Logger(namespace="wsprovider.session")
_NOT_YET = object()

OPEN, CLOSING, CLOSED = "open", "closing", "closed"


class ISessionTransport(Interface):
    """What a ``Session`` needs from the wire. Every method writes (or drops) at once."""

    def send_payload(payload):
        """Write one data frame (text or binary as the session's codec says)."""

    def send_prepared(prepared):
        """Write one frame prepared once for many sessions (``SessionHub.prepare``)."""

    def send_control(kind, payload):
        """Write a control frame now; ``kind`` is ``"pong"``."""

    def close(code, reason, grace):
        """Send a close frame with ``code``; abort the connection if the closing handshake is
        not done within ``grace`` seconds (None: the transport's default)."""

    def abort():
        """Drop the connection now, without a closing handshake."""

    def pause_reading():
        """Stop reading from the peer until ``resume_reading``."""

    def resume_reading():
        """Read from the peer again."""


class SessionStats:
    """Counters shared by the sessions of one hub (exported by ``wsprovider.metrics``)."""

    __slots__ = ("messages_in", "messages_out", "bytes_in", "bytes_out", "errors",
                 "slow_consumer_closes", "sessions_opened", "sessions_closed",
                 "rate_limited", "rate_limit_closes", "refusals", "auth_refusals",
                 "handshake_timeouts", "handshakes_pending", "requests_cancelled",
                 "fragment_closes")

    def __init__(self):
        self.messages_in = self.messages_out = self.bytes_in = self.bytes_out = 0
        self.errors = collections.Counter()
        self.slow_consumer_closes = 0
        self.sessions_opened = self.sessions_closed = 0
        self.rate_limited = self.rate_limit_closes = 0
        self.refusals = collections.Counter()       # refused handshakes by kind (auth, origin, ...)
        self.auth_refusals = collections.Counter()  # refused credentials by reason (missing, expired, ...)
        self.handshake_timeouts = 0                 # HTTP upgrades not done within HANDSHAKE_TIMEOUT_SEC
        self.handshakes_pending = 0                 # connections not upgraded yet (a gauge)
        self.requests_cancelled = 0                 # peers' requests cancelled because their session ended
        self.fragment_closes = 0                    # sessions closed for too many fragments in a message


class Refused(Exception):
    """A handshake is refused: the adapter answers with HTTP ``status``."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status = status
        self.kind = kind


class Admission:
    """What the hub decided for an accepted handshake."""

    __slots__ = ("identity", "subprotocol", "codec", "publish", "subscribe")

    def __init__(self, identity, subprotocol, codec, publish, subscribe):
        self.identity = identity
        self.subprotocol = subprotocol
        self.codec = codec
        self.publish = publish
        self.subscribe = subscribe


class _NoEntries(dict):
    """The one shared, always empty stand-in for a session's dicts until it needs its own."""

    def __setitem__(self, key, value):
        raise TypeError("the shared empty mapping cannot hold entries; give the session its own dict")

    def setdefault(self, key, default=None):
        raise TypeError("the shared empty mapping cannot hold entries; give the session its own dict")

    update = setdefault


_NONE = _NoEntries()


class Session:
    """One peer. Built by ``SessionHub.open_session`` once the WebSocket is open."""

    __slots__ = ("hub", "transport", "codec", "subprotocol", "identity", "publish_permissions",
                 "subscribe_permissions", "peer", "http_headers", "session_id", "address", "_own_prefix",
                 "connected_at", "state", "close_code", "_closed", "_subs", "_queues", "_sub_waiters",
                 "_address_subs", "_inflight", "_inflight_ids", "_owed", "_queue", "_queued_bytes",
                 "_abort_call", "_expiry_call", "_limiter", "__weakref__")

    def __init__(self, hub: "SessionHub", transport, admission: Admission, peer: str = "",
                 http_headers=None):
        self.hub = hub
        self.transport = transport
        self.codec = admission.codec
        self.subprotocol = admission.subprotocol
        self.identity = admission.identity
        self.publish_permissions = admission.publish
        self.subscribe_permissions = admission.subscribe
        self.peer = peer
        self.http_headers = http_headers or {}
        self.session_id = secrets.token_urlsafe(16)
        self.address = hub.session_prefix + self.session_id
        self._own_prefix = self.address + "."
        self.connected_at = hub.clock.seconds()
        self.state = OPEN
        self.close_code = None
        # Made on first use (most sessions never subscribe, request or answer): an idle
        # session holds the shared empty ``_NONE`` instead of four dicts, no OwedReplies
        # and no Deferred (docs/benchmarks.rst, W4).
        self._closed = None            # Deferreds of when_closed(), fired by closed()
        self._subs: dict = _NONE       # pattern -> ISubscription (None while subscribing)
        self._queues: dict = _NONE     # pattern -> queue group name (or None)
        self._sub_waiters: dict = _NONE  # pattern -> frame ids to acknowledge once live
        self._address_subs = ()
        self._inflight: dict = _NONE   # token -> the lattice's Deferred for a peer's request
        self._inflight_ids = 0
        self._owed = None              # OwedReplies: reply subjects this session may answer once
        self._queue = None             # deque of (kind, item, size) while the transport is full
        self._queued_bytes = 0
        self._abort_call = None
        self._expiry_call = None
        self._limiter = hub.new_rate_limiter()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self):
        hub = self.hub
        identity = self.identity
        if identity is not None and identity.expires_at is not None:
            self._expiry_call = hub.clock.callLater(
                max(0.0, identity.expires_at - hub.wall_clock()), self._credentials_expired)
        lattice = hub.lattice
        pending = [
            lattice.subscribe(self.address, self.deliver, on_status=self._bus_status),
            lattice.subscribe(self.address + ".>", self.deliver, on_status=self._bus_status),
        ]
        ready = [result_if_succeeded(d, _NOT_YET) for d in pending]
        if all(ISubscription.providedBy(s) for s in ready):
            self._addressable(ready)  # the local lattice: no DeferredList
        else:
            d = defer.gatherResults(pending, consumeErrors=True)
            d.addCallbacks(self._addressable, self._not_addressable)
        if hub.draining and self.state == OPEN:
            self.close(CLOSE_GOING_AWAY, "the service is shutting down")

    def _credentials_expired(self):
        self._expiry_call = None
        self.close(CLOSE_POLICY, "credentials expired; reconnect with a fresh token")

    def _addressable(self, subs):
        if self.state == CLOSED:
            for s in subs:
                s.unsubscribe()
            return
        self._address_subs = subs
        self.send_payload(self.codec.control(
            "welcome", session_id=self.session_id, reply_to=self.address,
            protocol=self.subprotocol, max_message_size=self.hub.config.max_message_size))

    def _not_addressable(self, failure):
        _log.error("session {id}: could not subscribe its address: {err}",
                   id=self.session_id, err=failure.getErrorMessage())
        self.close(CLOSE_INTERNAL, "the service cannot route messages to this session right now; retry later")

    def _bus_status(self, error):
        """A bus status for this session's address (NATS no responders to its publish)."""
        if self.state == OPEN:
            code = getattr(error, "code", None) or "no_responders"
            self.send_error(code, str(error))

    def when_closed(self) -> defer.Deferred:
        d = defer.Deferred()
        if self.state == CLOSED:
            d.callback(None)
        elif self._closed is None:
            self._closed = [d]
        else:
            self._closed.append(d)
        return d

    def close(self, code: int, reason: str, grace: float | None = None) -> None:
        """Start closing with ``code``; no frame goes out after the close frame."""
        if self.state != OPEN:
            return
        self.state = CLOSING
        self.close_code = code
        self._queue = None
        self._queued_bytes = 0
        self.transport.close(code, reason, grace)

    def closed(self, code, reason) -> None:
        """The adapter: the connection is gone. Releases everything the session held."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        if self.close_code is not None:
            code = self.close_code
        for call in (self._abort_call, self._expiry_call):
            if call is not None and call.active():
                call.cancel()
        self._abort_call = self._expiry_call = None
        hub = self.hub
        for sub in self._address_subs:
            sub.unsubscribe()
        self._address_subs = ()
        for sub in self._subs.values():
            if sub is not None:
                sub.unsubscribe()
        hub.subscription_count -= len(self._subs)
        self._subs = self._queues = self._sub_waiters = _NONE
        self._queue = None
        inflight, self._inflight = self._inflight, _NONE
        for d in inflight.values():  # their lattice entries and reply subscriptions go now
            hub.stats.requests_cancelled += 1
            d.cancel()
        lattice = hub.lattice
        owed, self._owed = self._owed, None
        for reply_to in (owed.clear() if owed is not None else ()):
            lattice.fail_reply(reply_to, NotConnected(
                f"session {self.session_id} disconnected before replying (close code {code})"))
        hub.session_closed(self, code, reason)
        waiters, self._closed = self._closed, None
        for d in waiters or ():
            d.callback(None)

    # -- inbound ------------------------------------------------------------------------

    def received(self, payload: bytes, is_binary: bool) -> None:
        """One whole WebSocket message from the peer."""
        hub = self.hub
        stats = hub.stats
        stats.messages_in += 1
        stats.bytes_in += len(payload)
        if self.state != OPEN:
            return  # crossed our close frame: no answer
        limiter = self._limiter
        if limiter is not None and not limiter.allow(len(payload)):
            self._rate_limited(limiter)
            return
        try:
            frame = self.codec.decode(payload, is_binary)
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

    def pinged(self, payload: bytes) -> None:
        """A WebSocket ping from the peer: rate-limited, and its pong counts against the budget."""
        if self.state != OPEN:
            return
        limiter = self._limiter
        if limiter is not None and not limiter.allow(len(payload)):
            self._rate_limited(limiter, answer=False)
            return
        if self._queue is None:
            self.transport.send_control("pong", payload)
        else:
            self._enqueue("pong", payload, len(payload) + 2)

    def _rate_limited(self, limiter, answer=True):
        stats = self.hub.stats
        stats.rate_limited += 1
        if limiter.violation():
            stats.rate_limit_closes += 1
            _log.warn("session {id} ({peer}) keeps exceeding its rate limit; closing it",
                      id=self.session_id, peer=self.peer)
            self.close(CLOSE_POLICY, "rate limit exceeded repeatedly")
            return
        if answer:
            config = self.hub.config
            self.send_error("rate_limited", "rate limit exceeded (RATE_LIMIT_MSGS_PER_SEC="
                            f"{config.rate_limit_msgs_per_sec:g}, RATE_LIMIT_BYTES_PER_SEC="
                            f"{config.rate_limit_bytes_per_sec:g}); the message was dropped")

    def _checked(self, frame):
        """Return the message to put on the lattice, or None after answering with an error."""
        msg = frame.message
        subject = msg.subject
        owed = self._owed is not None and bool(self._owed) and subject in self._owed
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
        elif not (reply_to == self.address or reply_to.startswith(self._own_prefix)):
            rule = self.publish_permissions.check_publish(reply_to)
            if rule is not None:
                self.send_error(PermissionDenied.code,
                                f"reply_to {reply_to!r} is not allowed ({rule}); use your own address "
                                f"{self.address!r} or a subject below it", frame.frame_id)
                return None
        if owed:
            self._owed.use(subject)  # one response per reply subject, as NATS allow_responses
        return msg

    def _publish(self, frame):
        msg = self._checked(frame)
        if msg is None:
            return
        d = self.hub.dispatch(msg)
        if d is None or result_if_succeeded(d, _NOT_YET) is None:
            return  # delivered synchronously
        d.addErrback(self._failed, frame.frame_id, msg.subject)

    def _failed(self, failure, frame_id, subject):
        err = failure.value
        if isinstance(err, defer.CancelledError):
            return None
        if isinstance(err, MessagingError):
            self.send_error(err.code, str(err), frame_id)
        else:
            _log.failure("publishing to {subject} failed", failure, subject=subject)
            self.send_error("internal_error", f"publishing to {subject!r} failed inside the service", frame_id)
        return None

    def _request(self, frame):
        hub = self.hub
        if hub.draining:
            self.send_error("going_away", "the service is shutting down; send the request again after "
                            "reconnecting", frame.frame_id)
            return
        limit = hub.config.max_inflight_requests
        if limit and len(self._inflight) >= limit:
            hub.stats.errors[TooManyRequests.code] += 1
            self.send_payload(self.codec.error(
                TooManyRequests.code, f"{len(self._inflight)} of your requests are already waiting for a reply "
                f"(MAX_INFLIGHT_REQUESTS={limit}); wait for one to finish", frame.frame_id))
            return
        msg = self._checked(frame)
        if msg is None:
            return
        config = hub.config
        timeout = min(frame.timeout_ms or config.request_timeout_ms, config.max_request_timeout_ms)
        self._inflight_ids += 1
        token = self._inflight_ids
        started = hub.clock.seconds()
        hub.request_started()
        try:
            d = hub.lattice.request(msg.subject, msg.body, timeout)
        except Exception:
            d = defer.fail()
        frame_id = frame.frame_id
        if not d.called:
            if self._inflight is _NONE:
                self._inflight = {}
            self._inflight[token] = d
        d.addCallbacks(self._replied, self._failed, callbackArgs=(frame_id,),
                       errbackArgs=(frame_id, msg.subject))
        d.addBoth(self._request_done, token, started)

    def _request_done(self, result, token, started):
        self._inflight.pop(token, None)
        hub = self.hub
        hub.request_finished(hub.clock.seconds() - started)
        if hub.draining and not self._inflight and self.state == OPEN:
            self.close(CLOSE_GOING_AWAY, "the service is shutting down")
        return None

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def _replied(self, reply, frame_id):
        if self.state == OPEN:
            payload = self.codec.message(reply, kind="reply", frame_id=frame_id)
            limit = self.hub.config.max_message_size
            if len(payload) > limit:
                err = self._too_large(reply, len(payload))
                self.send_error(err.code, str(err), frame_id)
                return
            self.send_payload(payload)

    def _subscribe(self, frame):
        pattern = frame.subject
        hub = self.hub
        if pattern in self._subs:
            held = self._queues.get(pattern)
            if held != frame.queue:
                self.send_error("already_subscribed",
                                f"this session already subscribes to {pattern!r} "
                                f"{'in queue ' + repr(held) if held else 'without a queue'}; "
                                "unsubscribe first to change the queue", frame.frame_id)
                return
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
        config = hub.config
        if len(self._subs) >= config.max_subscriptions:
            self.send_error("too_many_subscriptions",
                            f"this session already holds {len(self._subs)} subscriptions (MAX_SUBSCRIPTIONS); "
                            "unsubscribe from one first", frame.frame_id)
            return
        total = config.max_total_subscriptions
        if total and hub.subscription_count >= total:
            self.send_error("too_many_subscriptions",
                            f"the service holds {hub.subscription_count} peer subscriptions "
                            "(MAX_TOTAL_SUBSCRIPTIONS); retry later", frame.frame_id)
            return
        if self._subs is _NONE:
            self._subs, self._queues, self._sub_waiters = {}, {}, {}
        self._subs[pattern] = None  # reserved while the lattice subscribes
        self._queues[pattern] = frame.queue
        hub.subscription_count += 1
        waiting = self._sub_waiters[pattern] = [frame.frame_id]
        try:
            d = hub.lattice.subscribe(pattern, self.deliver, frame.queue)
        except Exception:
            d = defer.fail()

        def done(sub):
            current = self._sub_waiters.get(pattern) is waiting
            if current:
                del self._sub_waiters[pattern]
            if self.state == CLOSED or not current:
                sub.unsubscribe()  # closed, or unsubscribed (and maybe subscribed anew) meanwhile
                return
            self._subs[pattern] = sub
            for frame_id in waiting:
                self.send_payload(self.codec.control("subscribed", subject=pattern, id=frame_id))

        def failed(failure):
            if self._sub_waiters.get(pattern) is waiting:
                del self._sub_waiters[pattern]
                if pattern in self._subs:
                    del self._subs[pattern]
                    self._queues.pop(pattern, None)
                    hub.subscription_count -= 1
            for frame_id in waiting:
                self._failed(failure, frame_id, pattern)

        d.addCallbacks(done, failed)

    def _unsubscribe(self, frame):
        pattern = frame.subject
        if pattern not in self._subs:
            self.send_error("not_subscribed", f"this session has no subscription to {pattern!r}", frame.frame_id)
            return
        sub = self._subs.pop(pattern)
        self._queues.pop(pattern, None)
        self.hub.subscription_count -= 1
        self._sub_waiters.pop(pattern, None)  # a subscription still on its way is dropped when it lands
        if sub is not None:
            sub.unsubscribe()
        self.send_payload(self.codec.control("unsubscribed", subject=pattern, id=frame.frame_id))

    # -- outbound -----------------------------------------------------------------------

    def deliver(self, msg: BrokerMessage):
        """Lattice callback: a message for this session."""
        if self.state != OPEN:  # closed, or our close frame is out
            raise NotConnected(f"session {self.session_id} is closed")
        payload = self.codec.message(msg)
        if len(payload) > self.hub.max_message_size:
            raise self._too_large(msg, len(payload))
        if self.send_payload(payload):
            reply_to = msg.reply_to
            if reply_to is not None and not reply_to.startswith(self.address):
                owed = self._owed
                if owed is None:
                    hub = self.hub
                    owed = self._owed = OwedReplies(hub.clock, MAX_OWED_REPLIES,
                                                    hub.config.max_request_timeout_ms / 1000.0)
                owed.grant(reply_to)
        elif self.state != OPEN:
            raise NotConnected(f"session {self.session_id} is closed (slow consumer)")

    def _too_large(self, msg, size) -> MessagingError:
        # The limit is symmetric (as NATS' max_payload): the peer announced it in welcome.
        self.hub.stats.errors["too_large"] += 1
        return MessagingError(
            f"message to {msg.subject!r} is {size} bytes framed, larger than session {self.session_id}'s "
            f"limit of {self.hub.config.max_message_size} bytes (MAX_MESSAGE_SIZE); it was not delivered",
            code="too_large")

    def send_error(self, code, message, frame_id=None):
        self.hub.stats.errors[code] += 1
        self.send_payload(self.codec.error(code, message, frame_id))

    def send_payload(self, payload: bytes) -> bool:
        """Send one encoded frame, or queue it while the transport is full."""
        if self.state != OPEN:  # no data frame after a close frame
            return False
        stats = self.hub.stats
        stats.messages_out += 1
        stats.bytes_out += len(payload)
        if self._queue is None:
            self.transport.send_payload(payload)
            return True
        return self._enqueue("data", payload, len(payload))

    def send_prepared(self, prepared, size: int) -> bool:
        if self.state != OPEN:
            return False
        stats = self.hub.stats
        stats.messages_out += 1
        stats.bytes_out += size
        if self._queue is None:
            self.transport.send_prepared(prepared)
            return True
        return self._enqueue("prepared", prepared, size)

    def _enqueue(self, kind, item, size):
        self._queue.append((kind, item, size))
        self._queued_bytes += size
        if self._queued_bytes > self.hub.config.outbound_buffer_bytes:
            self._slow_consumer()
            return False
        return True

    def _slow_consumer(self):
        hub = self.hub
        hub.stats.slow_consumer_closes += 1
        _log.warn("session {id} ({peer}) is a slow consumer: {queued} bytes waiting; closing it",
                  id=self.session_id, peer=self.peer, queued=self._queued_bytes)
        limit = hub.config.outbound_buffer_bytes
        grace = hub.config.slow_consumer_grace_sec
        self.close(CLOSE_SLOW_CONSUMER, f"slow consumer: more than {limit} bytes waiting", grace)
        # A reader that has stopped may never read the close frame: abort after the grace.
        self._abort_call = hub.clock.callLater(grace, self._abort_if_open)

    def _abort_if_open(self):
        self._abort_call = None
        if self.state != CLOSED:
            self.transport.abort()

    def transport_paused(self):
        """The transport's buffer is full: queue from now on."""
        if self._queue is None and self.state == OPEN:
            self._queue = collections.deque()

    def transport_resumed(self):
        """The transport can take more: write what waited, in order."""
        queue = self._queue
        self._queue = None
        if not queue or self.state != OPEN:
            self._queued_bytes = 0
            return
        transport = self.transport
        queued = self._queued_bytes
        while queue:
            kind, item, size = queue.popleft()
            queued -= size
            if kind == "data":
                transport.send_payload(item)
            elif kind == "prepared":
                transport.send_prepared(item)
            else:
                transport.send_control(kind, item)
            if self._queue is not None:  # paused again while writing
                self._queue.extend(queue)
                self._queued_bytes = queued
                return
        self._queued_bytes = 0

    def describe(self) -> dict:
        return {
            "session_id": self.session_id,
            "address": self.address,
            "connected_at": self.connected_at,
            "peer": self.peer,
            "subprotocol": self.subprotocol,
            "subscriptions": sorted(self._subs),
            "mode": "server",
            "principal": self.identity.principal if self.identity is not None else None,
        }


@implementer(IMessagingConsumer, ISessionRegistry)
class SessionHub:
    """The sessions of one server: admission, registry, drain and broadcast.

    :param lattice: an ``ILattice``.
    :param config: a ``ProviderConfig``.
    :param clock: an ``IReactorTime``.
    :param authenticator: an ``auth.Authenticator`` or None (no credentials required).
    :param prepare: ``f(payload, is_binary)`` framing a payload once for many sessions
        (the adapter's; None: each session frames it itself).
    """

    request_latency = None  # a prometheus Histogram, set by wsprovider.metrics

    def __init__(self, lattice, config, clock, authenticator=None, prepare=None, wall_clock=None):
        self.lattice = lattice
        self.config = config
        self.clock = clock
        if wall_clock is None:
            import time
            wall_clock = time.time
        self.wall_clock = wall_clock
        self.authenticator = authenticator
        self.prepare = prepare
        self.stats = SessionStats()
        self.sessions: dict[str, Session] = {}
        self.session_prefix = f"{config.subject_prefix}.session."
        self.broadcast_prefix = f"{config.subject_prefix}.broadcast."
        self.publish_permissions = config.publish_permissions()
        self.subscribe_permissions = config.subscribe_permissions()
        self.rate_limited = bool(config.rate_limit_msgs_per_sec or config.rate_limit_bytes_per_sec)
        # Read on every delivery: a plain attribute (the config resolves names through a table).
        self.max_message_size = config.max_message_size
        self.connection_count = 0   # sessions admitted, not closed yet (MAX_CONNECTIONS)
        self.subscription_count = 0  # peers' subscriptions, all sessions (MAX_TOTAL_SUBSCRIPTIONS)
        self.inflight = 0           # peers' requests not answered yet (drain)
        self.draining = False
        self._inflight_waiters = []
        self._broadcast_sub = None
        self._broadcast_waiters: dict = {}
        self._observers = []
        self._live: set = set()     # every open session, tracked or not (stop, drain)
        if ISynchronousDispatch.providedBy(lattice):
            self.dispatch = lattice.dispatch
        else:
            self.dispatch = lattice.publish

    def new_rate_limiter(self):
        if not self.rate_limited:
            return None
        c = self.config
        return SessionRateLimiter(c.rate_limit_msgs_per_sec, c.rate_limit_bytes_per_sec, c.rate_limit_burst_sec,
                                  c.rate_limit_max_violations, c.rate_limit_window_sec, clock=self.clock.seconds)

    # -- admission ----------------------------------------------------------------------

    def admit(self, headers, params, offered, pending_handshakes: int = 0) -> Admission:
        """Decide on an opening handshake. Raises ``Refused``; counts what it refuses."""
        try:
            return self._admit(headers, params, offered, pending_handshakes)
        except Refused as e:
            self.stats.refusals[e.kind] += 1
            raise

    def _admit(self, headers, params, offered, pending_handshakes):
        if self.draining:
            raise Refused(503, "draining", "the service is shutting down; connect again (to another instance)")
        limit = self.config.max_connections
        if limit and self.connection_count >= limit:
            raise Refused(503, "max_connections", f"too many connections: this server accepts {limit} sessions "
                                                  "(MAX_CONNECTIONS); retry later")
        identity = None
        publish, subscribe = self.publish_permissions, self.subscribe_permissions
        if self.authenticator is not None:
            from .auth import AuthError
            try:
                identity = self.authenticator.authenticate(headers, params)
            except AuthError as e:
                self.stats.auth_refusals[e.reason] += 1
                _log.info("refused a session: {why}", why=str(e))
                raise Refused(401, "auth", str(e)) from None
            except Exception as e:  # a credential the checker could not even read: still a 401
                self.stats.auth_refusals["invalid"] += 1
                _log.info("refused a session: unusable credentials ({kind})", kind=type(e).__name__)
                raise Refused(401, "auth", "invalid credentials") from None
            if identity.publish is not None:
                publish = identity.publish
            if identity.subscribe is not None:
                subscribe = identity.subscribe
        chosen = None
        if offered:
            for p in offered:
                if p in envelope.CODECS:
                    chosen = p
                    break
            if chosen is None:
                raise Refused(400, "subprotocol",
                              "unsupported subprotocol; this server speaks " + ", ".join(envelope.SUBPROTOCOLS))
        subprotocol = chosen or envelope.JSON_PROTOCOL
        self.connection_count += 1
        return Admission(identity, chosen, envelope.CODECS[subprotocol], publish, subscribe)

    def release(self, admission: Admission) -> None:
        """An admitted handshake ended (the session closed, or never opened)."""
        self.connection_count -= 1

    def open_session(self, transport, admission: Admission, peer="", http_headers=None) -> Session:
        session = Session(self, transport, admission, peer, http_headers)
        if session.subprotocol is None:
            session.subprotocol = envelope.JSON_PROTOCOL
        self.stats.sessions_opened += 1
        self._live.add(session)
        if self.config.enable_session_tracking:
            self.sessions[session.session_id] = session
        _log.info("session {id} opened from {peer} ({proto})", id=session.session_id,
                  peer=peer, proto=session.subprotocol)
        for o in self._observers:
            o.session_opened(session)
        session.start()
        return session

    def session_closed(self, session, code, reason):
        self.stats.sessions_closed += 1
        self._live.discard(session)
        self.sessions.pop(session.session_id, None)
        _log.info("session {id} closed (code {code}: {reason})", id=session.session_id,
                  code=code, reason=reason or "")
        for o in self._observers:
            o.session_closed(session, code, reason)

    def add_observer(self, observer):
        """``observer.session_opened(session)`` / ``session_closed(session, code, reason)``."""
        self._observers.append(observer)

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
        for session in list(self._live):
            waits.append(session.when_closed())
            session.close(code, reason)  # already closing: wait for its handshake
        for waiters in self._broadcast_waiters.values():
            for w in list(waiters):
                w.cancel()
        return defer.DeferredList(waits)

    def drain(self, timeout: float, code=CLOSE_GOING_AWAY, reason="the service is shutting down"):
        """Graceful shutdown: refuse new sessions, close idle sessions now, let the peers' in-flight
        requests finish for up to ``timeout`` seconds (their sessions close once answered), then
        close whatever is left. Deferred firing when every session is gone."""
        self.draining = True
        for session in list(self._live):
            if not session.inflight:
                session.close(code, reason)
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

        timer = self.clock.callLater(timeout, expired)
        waiter.addCallback(lambda _: timer.cancel() if timer.active() else None)
        return waiter.addCallback(lambda _: self.stop(code, reason))

    def request_started(self):
        self.inflight += 1

    def request_finished(self, seconds: float):
        self.inflight -= 1
        histogram = self.request_latency
        if histogram is not None:
            histogram.observe(seconds)
        if not self.inflight and self._inflight_waiters:
            waiters, self._inflight_waiters = self._inflight_waiters, []
            for w in waiters:
                if not w.called:
                    w.callback(None)

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
        lattice = self.lattice
        if IAddressedDelivery.providedBy(lattice):  # keeps msg's subject, acknowledged by its instance
            d = lattice.publish_to_address(address, msg, self.config.request_timeout_ms)
        else:
            d = lattice.publish(msg.replace(subject=address) if msg.subject != address else msg)
        return d.addErrback(self._no_such_session, session_id)

    @staticmethod
    def _no_such_session(failure, session_id):
        failure.trap(MessagingError)
        raise NotConnected(f"no session {session_id!r} is connected") from None

    def broadcast(self, msg):
        """Send ``msg`` to every session on every instance sharing the lattice.

        Returns a Deferred firing with the number of sessions that *this* broadcast reached
        on this instance: the count of the delivery of this very message when it comes
        back from the lattice. With the embedded lattice (``IExactBroadcastCount``) that is
        every session there is; on a shared bus, sessions on other instances are not
        counted. If the message does not come back within ``REQUEST_TIMEOUT_MS`` (a bus
        that does not echo, or is down), the count is 0.
        """
        out = msg.replace(subject=self.broadcast_prefix + msg.subject)
        key = (out.subject, out.body, out.reply_to)
        waiter = defer.Deferred()
        waiters = self._broadcast_waiters.setdefault(key, collections.deque())
        waiters.append(waiter)

        def forget(result):
            queue = self._broadcast_waiters.get(key)
            if queue is not None:
                try:
                    queue.remove(waiter)
                except ValueError:
                    pass
                if not queue:
                    del self._broadcast_waiters[key]
            return result

        timer = self.clock.callLater(self.config.request_timeout_ms / 1000.0,
                                     lambda: waiter.called or waiter.callback(0))
        waiter.addBoth(lambda r: (timer.cancel() if timer.active() else None, r)[1])
        waiter.addBoth(forget)
        waiter.addErrback(lambda f: f.trap(defer.CancelledError) and 0)
        sent = self.lattice.publish(out)

        def not_sent(failure):
            if not waiter.called:
                waiter.cancel()
            return failure
        return sent.addCallbacks(lambda _: waiter, not_sent)

    def _broadcast_from_lattice(self, msg):
        count = self.broadcast_local(msg.replace(subject=msg.subject[len(self.broadcast_prefix):]))
        waiters = self._broadcast_waiters.get((msg.subject, msg.body, msg.reply_to))
        if waiters:
            waiter = waiters.popleft()
            if not waiters:
                del self._broadcast_waiters[(msg.subject, msg.body, msg.reply_to)]
            if not waiter.called:
                waiter.callback(count)

    def broadcast_local(self, msg) -> int:
        """Frame ``msg`` once per codec and send it to every session here."""
        prepared = {}
        count = 0
        limit = self.config.max_message_size
        prepare = self.prepare
        for session in list(self.sessions.values()):
            codec = session.codec
            entry = prepared.get(codec.name)
            if entry is None:
                payload = codec.message(msg)
                if len(payload) > limit:
                    self.stats.errors["too_large"] += 1
                    _log.warn("broadcast on {subject} dropped: {size} bytes framed exceeds MAX_MESSAGE_SIZE "
                              "({limit})", subject=msg.subject, size=len(payload), limit=limit)
                    return 0
                entry = prepared[codec.name] = (
                    prepare(payload, codec.is_binary) if prepare is not None else None, payload, len(payload))
            frame, payload, size = entry
            if (session.send_prepared(frame, size) if frame is not None else session.send_payload(payload)):
                count += 1
        return count

    def disconnect(self, session_id, code=CLOSE_NORMAL, reason="closed by the service"):
        session = self.sessions.get(session_id)
        if session is None:
            return defer.succeed(False)
        session.close(code, reason)
        return defer.succeed(True)
