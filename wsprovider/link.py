"""The sans-IO core of a client link: the session side of one outbound connection.

``LinkCore`` is what a client link *does* with a connection, without knowing how the
connection is made (``connector.Connector``) or what carries it (the thin Autobahn
protocol in ``client.py``): it turns frames from the server into lattice messages for the
linked handlers, and what components send into frames; it routes replies both ways,
keeps the replies it owes the server, holds requests waiting for a reply
(``replies.PendingReplies``), buffers while the link cannot write
(``outbound.OutboundBuffer``), and cuts loops (``loopguard``).

It touches only what it is given: an ``ILattice``, an ``IReactorTime``, and while
connected an ``ILinkTransport`` with an ``envelope.IFrameCodec``. Tests drive it with
``task.Clock``, the local lattice and a recording transport (tests/test_link.py).

Reply subjects the link mints (for its requests and for components' ``reply_to``) live at
``<the link's address at the server>._r.<n>``, so they cannot clash with other subjects
there.
"""

from __future__ import annotations

import collections
import itertools

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface

from . import envelope
from .envelope import IEnvelopeWire, Message
from .loopguard import EchoFilter, LoopDetected, LoopGuard
from .message import (BrokerMessage, BufferFull, MessagingError, NoResponders, NotConnected,
                      PermissionDenied, RequestTimeout)
from .outbound import OutboundBuffer, Outgoing
from .replies import OwedReplies, PendingReplies, TooManyRequests
from .subjects import SubjectError, check_subject, matches

REPLY_TOKEN = "_r"
MAX_OWED_REPLIES = 1024
MAX_ROUTES = 4096
MAX_REQUESTS = 4096

_REMOTE_ERRORS = {cls.code: cls for cls in (NoResponders, PermissionDenied, RequestTimeout, NotConnected)}


class ILinkTransport(Interface):
    """What the core writes frames to: one open WebSocket connection."""

    def write(payload, is_binary):
        """Send one WebSocket message."""

    def writable():
        """True while the connection is open and the transport is not asking us to pause."""


class _Request:
    __slots__ = ("outgoing", "sent")

    def __init__(self, outgoing):
        self.outgoing = outgoing
        self.sent = False


class ReplyRouter:
    """A link's replies, both ways: its requests waiting for a reply (``PendingReplies``),
    the routes for components' ``reply_to`` subjects, and the replies it owes the server
    (``OwedReplies``, each with a lattice subscription and the depth of what it answers)."""

    def __init__(self, lattice, clock, config, name, log):
        self.lattice = lattice
        self.name = name
        self.log = log
        self.ttl = config.max_request_timeout_ms / 1000.0
        self.requests = PendingReplies(clock, max_pending=MAX_REQUESTS, timeout_error=self._timeout_error)
        self.routes = PendingReplies(clock, max_pending=MAX_ROUTES)
        self.owed = OwedReplies(clock, MAX_OWED_REPLIES, self.ttl, on_drop=self._owed_dropped)
        self._owed_subs = {}
        self._owed_hops = {}
        self._raw_waiting = collections.deque()   # request keys, oldest first (raw wire)
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self.requests)

    # requests

    def add_request(self, subject, timeout_ms, out) -> tuple:
        """``(key, Deferred)`` for a new request; raises ``TooManyRequests``."""
        key = str(next(self._ids))
        return key, self.requests.add(key, timeout_ms / 1000.0, label=subject, data=_Request(out))

    def request_sent(self, key, addressed: bool) -> bool:
        """Mark the request written; False if it already ended (timed out while buffered)."""
        entry = self.requests.get(key)
        if entry is None:
            return False
        entry.data.sent = True
        if not addressed:
            self._raw_waiting.append(key)
        return True

    def answer_next(self, msg) -> bool:
        """Raw wire: ``msg`` answers the oldest request still waiting, if any."""
        while self._raw_waiting:
            if self.requests.resolve(self._raw_waiting.popleft(), msg):
                return True
        return False

    def answer(self, token, msg):
        """Envelope: ``msg`` arrived on the reply subject minted with ``token``. True if it
        answered a request; else the lattice subject it is routed to, or None (too late)."""
        if self.requests.resolve(token, msg):
            return True
        route = self.routes.take(token)
        return route.data if route is not None else None

    def fail(self, key, error_for) -> bool:
        """Fail request ``key`` with ``error_for(subject)``; False if there is no such request."""
        entry = self.requests.get(key)
        return entry is not None and self.requests.fail(key, error_for(entry.label))

    def _timeout_error(self, entry, timeout):
        return RequestTimeout(f"request to {entry.label!r} over {self.name} timed out after "
                              f"{round(timeout * 1000)}ms")

    # routes: components' reply_to subjects

    def route(self, local) -> str | None:
        """A token whose reply is published on ``local``; None when too many routes are open."""
        token = str(next(self._ids))
        try:
            d = self.routes.add(token, self.ttl, label=local, data=local)
        except TooManyRequests:
            self.log.warn("{name}: {n} reply routes are open (limit {limit}); the answer to {local} cannot be "
                          "routed back", name=self.name, n=len(self.routes), limit=MAX_ROUTES, local=local)
            return None
        d.addErrback(lambda _: None)   # expired or closed: nothing waits on a route
        return token

    # owed replies: the server's reply subjects that handlers here may answer

    def owe(self, subject, hops, callback):
        """Let answers to ``subject`` (reaching ``callback`` from the lattice) go back over the
        link once. None, or a Deferred to wait for before delivering (asynchronous lattice)."""
        new = self.owed.grant(subject)
        self._owed_hops[subject] = hops
        if not new:
            return None

        def subscribed(sub):
            if subject in self.owed and subject not in self._owed_subs:
                self._owed_subs[subject] = sub
            else:
                sub.unsubscribe()

        def failed(failure):
            self.log.warn("{name}: cannot route replies to {subject}: {error}", name=self.name, subject=subject,
                          error=failure.getErrorMessage())

        d = self.lattice.subscribe(subject, callback)
        d.addCallbacks(subscribed, failed)
        return None if d.called else d

    def spend(self, subject):
        """The depth of what a reply to ``subject`` answers, spending the permission; None if not owed."""
        if subject not in self.owed:
            return None
        hops = self._owed_hops.get(subject, 0)
        self.owed.use(subject)
        return hops

    def _owed_dropped(self, subject):
        self._owed_hops.pop(subject, None)
        sub = self._owed_subs.pop(subject, None)
        if sub is not None:
            sub.unsubscribe()

    # the connection

    def connection_lost(self, error) -> None:
        """Fail what was sent and waits; buffered requests wait for the next connection."""
        for entry in self.requests:
            if entry.data.sent:
                self.requests.fail(entry.key, error)
        self._raw_waiting.clear()
        for entry in self.routes:
            self.routes.take(entry.key)
            self.lattice.fail_reply(entry.data, error)
        self.owed.clear()

    def close(self, error) -> None:
        self.connection_lost(error)
        self.requests.close(error)
        self.routes.close(error)


class LinkCore:
    """One link's session logic. The adapter calls ``attach`` / ``connected`` /
    ``disconnected`` / ``received`` / ``close``; components call ``send`` / ``request``;
    the lattice calls ``from_address`` / ``from_outbound``."""

    def __init__(self, lattice, clock, config, name: str, address: str, log: Logger | None = None):
        self.log = log if log is not None else Logger()   # the link's, so that its lines share one namespace
        self.lattice = lattice
        self.clock = clock
        self.config = config
        self.name = name                    # "client link <id> to <uri>", for messages
        self.address = address
        self.transport = None
        self.codec = None
        self.ready = False
        self.on_ready = None                # set by the adapter with each attach
        self.remote_session_id = self.remote_reply_to = None
        self.messages_in = self.messages_out = self.remote_errors = 0
        self.buffer = OutboundBuffer(config.offline_buffer_bytes)
        self.replies = ReplyRouter(lattice, clock, config, name, self.log)
        self.guard = LoopGuard(clock, name, config.max_reply_hops, config.max_answers_per_sec, self.log)
        self.echoes = EchoFilter(clock)
        self.closed_error = None            # set once the link is closed or gave up
        self._addressed = False             # the wire carries subjects (IEnvelopeWire)
        self._reply_base = address
        self._delivering = None             # reply depth of the message being delivered now
        self._last_hops = 0                 # ... and of the last one delivered
        self._gate = None
        self._gate_queue = collections.deque()

    # -- the connection ----------------------------------------------------------------

    def attach(self, transport, codec, on_ready) -> None:
        """A WebSocket connection is open with ``codec``; ``on_ready()`` once it is usable
        (envelope: the welcome frame; the adapter calls ``connected`` then)."""
        self.transport = transport
        self.codec = codec
        self.on_ready = on_ready
        self.ready = False
        self._addressed = IEnvelopeWire.providedBy(codec)
        self.remote_session_id = self.remote_reply_to = None
        self._reply_base = self.address

    def connected(self) -> None:
        self.ready = True
        if self._addressed:
            for pattern in self.config.remote_subscriptions:
                self._write_frame(envelope.Subscribe(pattern))
        self.flush()

    def disconnected(self, error: MessagingError) -> None:
        """The connection is gone: what was sent and waits for a reply fails with ``error``;
        what is buffered waits for the next connection."""
        self.transport = self.codec = self.on_ready = None
        self.ready = False
        self.replies.connection_lost(error)

    def close(self, reason: str, error: NotConnected) -> None:
        """The link is closed for good (deleted, or gave up): refuse, fail and drop everything."""
        self.closed_error = error
        self.disconnected(error)
        dropped = 0
        for out in self.buffer.clear():
            if out.request is not None:
                self.replies.fail(out.request, lambda subject: NotConnected(
                    f"request to {subject!r} not sent: {self.name} {reason}"))
            else:
                dropped += 1
        self.replies.close(error)
        if dropped:
            self.log.warn("{name}: {n} buffered message(s) were never sent: {reason}", name=self.name, n=dropped,
                          reason=reason)

    def writable(self) -> bool:
        transport = self.transport
        return self.ready and transport is not None and transport.writable()

    def flush(self) -> None:
        self.buffer.flush(self.writable, self._write)

    # -- server -> lattice -------------------------------------------------------------

    def received(self, payload: bytes, is_binary: bool) -> None:
        """One WebSocket message from the server."""
        try:
            frame = self.codec.decode_from_server(payload, is_binary)
        except envelope.FrameError as e:
            self.log.warn("{name}: unusable frame from the server: {error}", name=self.name, error=e)
            return
        kind = frame.kind
        if kind == envelope.WELCOME:
            if not self.ready:
                self.remote_session_id = frame.session_id
                self.remote_reply_to = frame.reply_to
                self._reply_base = frame.reply_to or self.address
                self.on_ready()
            return
        if frame.message is not None:
            if not self.ready:
                self.on_ready()   # a server that speaks the envelope without a welcome frame
                if not self.ready:
                    return
            self.messages_in += 1
            self._deliver(frame.message, frame.hops)
        elif kind == envelope.ERROR:
            self._remote_error(frame)
        else:
            self.log.debug("{name}: {kind} {subject}", name=self.name, kind=kind, subject=frame.subject or "")

    def _deliver(self, msg: BrokerMessage, hops: int) -> None:
        if not self._addressed:
            if self.replies.answer_next(msg):   # raw: the next frame answers the oldest request
                return
            self._to_lattice(msg.replace(reply_to=self.address), self.guard.depth_of_echo(msg.body))
            return
        subject = msg.subject
        base = self._reply_base
        prefix = f"{base}.{REPLY_TOKEN}."
        if subject.startswith(prefix):
            routed = self.replies.answer(subject[len(prefix):], msg)
            if routed is True:
                return
            if routed is not None:
                self._to_lattice(msg.replace(subject=routed), hops)
            else:
                self.log.info("{name}: a reply on {subject} came after its request ended; dropped",
                              name=self.name, subject=subject)
            return
        if subject == base:
            msg = msg.replace(subject=envelope.PLAIN_TEXT_SUBJECT)
        elif subject.startswith(base) and subject[len(base)] == ".":
            msg = msg.replace(subject=subject[len(base) + 1:])
        self._to_lattice(msg, hops)

    def _remote_error(self, frame) -> None:
        self.remote_errors += 1
        cls = _REMOTE_ERRORS.get(frame.code)

        def error_for(subject):
            text = f"the server answered the request to {subject!r} with {frame.code}: {frame.text}"
            return cls(text) if cls else MessagingError(text, code=frame.code)
        if frame.frame_id is not None and self.replies.fail(str(frame.frame_id), error_for):
            return
        self.log.warn("{name}: the server reported {code}: {message}", name=self.name, code=frame.code,
                      message=frame.text)

    def _to_lattice(self, msg, hops) -> None:
        if self._gate is not None:
            self._gate_queue.append((msg, hops))
            return
        reply_to = msg.reply_to
        waiting = None
        if reply_to is None:
            msg = msg.replace(reply_to=self.address)
        elif reply_to != self.address and not reply_to.startswith(self.address + "."):
            waiting = self.replies.owe(reply_to, hops, self._owed_reply)
        if waiting is None:
            self._publish_inbound(msg, hops)
            return
        # An asynchronous lattice: hold this and later messages until replies can be routed.
        self._gate = waiting

        def go(_):
            self._gate = None
            self._publish_inbound(msg, hops)
            while self._gate_queue and self._gate is None:
                self._to_lattice(*self._gate_queue.popleft())

        waiting.addBoth(go)

    def _publish_inbound(self, msg, hops) -> None:
        copies = sum(1 for p in self.config.outbound_subjects if matches(p, msg.subject))
        if copies:
            self.echoes.expect(msg, copies)   # it comes back to from_outbound: not an outbound message
        self._last_hops = hops
        outer, self._delivering = self._delivering, hops
        try:
            d = self.lattice.publish(msg)
        finally:
            self._delivering = outer
        d.addErrback(self._not_handled, msg.subject)

    def _not_handled(self, failure, subject):
        if not failure.check(LoopDetected):   # already explained by the loop guard's warning
            self.log.warn("{name}: a message from the server on {subject!r} was not handled: {error}",
                          name=self.name, subject=subject, error=failure.getErrorMessage())

    def _owed_reply(self, msg):
        return self.send(msg)

    # -- lattice -> server -------------------------------------------------------------

    def from_address(self, msg):
        return self.send(msg)

    def from_outbound(self, msg):
        if self.echoes.is_echo(msg):
            return None  # it just came from this server: do not send it back
        return self.send(msg)

    def send(self, msg) -> defer.Deferred:
        """Send ``msg`` to the server now, or buffer it while the link cannot write."""
        if self.closed_error is not None:
            return defer.fail(self.closed_error)
        hops, answer = self._depth(msg)
        msg = self._map_own_address(msg)
        cut = self.guard.check(msg, hops, answer)
        if cut is not None:
            return defer.fail(cut)
        out = Outgoing(msg, hops)
        if not self.buffer and self.writable():
            self._write(out)
            return defer.succeed(None)
        if not self.buffer.add(out):
            return defer.fail(self._buffer_full(out))
        return defer.succeed(None)

    def request(self, subject, body, timeout_ms) -> defer.Deferred:
        try:
            check_subject(subject)
        except SubjectError as e:
            return defer.fail(MessagingError(str(e), code="bad_subject"))
        if type(timeout_ms) is not int or timeout_ms <= 0:
            return defer.fail(MessagingError(f"timeout_ms must be a positive integer, got {timeout_ms!r}",
                                             code="bad_request"))
        if self.closed_error is not None:
            return defer.fail(self.closed_error)
        out = Outgoing(BrokerMessage(subject, body))
        writable = not self.buffer and self.writable()
        if not writable and not self.buffer.fits(out):
            return defer.fail(self._buffer_full(out))
        try:
            out.request, d = self.replies.add_request(subject, timeout_ms, out)
        except TooManyRequests as e:
            return defer.fail(e)
        d.addErrback(self._request_ended, out)
        if writable:
            self._write(out)
        else:
            self.buffer.add(out)
        return d

    def _request_ended(self, failure, out):
        self.buffer.remove(out)   # timed out or cancelled while still buffered
        return failure

    def pending_requests(self) -> int:
        return len(self.replies)

    def _depth(self, msg):
        """(reply depth, is it an answer to the server?) of a message about to be sent."""
        subject = msg.subject
        hops = self.replies.spend(subject)
        if hops is not None:
            # The answer to an explicit reply_to ends that exchange: it keeps the request's depth.
            # Chains of unsolicited answers grow through the link's address (below).
            return hops, True
        if self._delivering is not None:       # sent while a message from the server is delivered
            return self._delivering + 1, True
        address = self.address
        if subject == address or (subject.startswith(address) and subject[len(address)] == "."):
            return self._last_hops + 1, True   # to the reply_to the link gives the server's messages
        return 0, False

    def _map_own_address(self, msg):
        """A message to this link's address goes to the server as 'message'; to address.X as X."""
        subject = msg.subject
        address = self.address
        if subject == address:
            return msg.replace(subject=envelope.PLAIN_TEXT_SUBJECT)
        if subject.startswith(address) and subject[len(address)] == ".":
            return msg.replace(subject=subject[len(address) + 1:])
        return msg

    def _buffer_full(self, out) -> BufferFull:
        why = "connected but the server is not reading fast enough" if self.ready else "not connected"
        return BufferFull(
            f"{self.name} is {why}, and its offline buffer is full ({len(self.buffer)} message(s), "
            f"{self.buffer.bytes} of OFFLINE_BUFFER_BYTES={self.buffer.limit} bytes; this one needs {out.size}); "
            "the message was not accepted")

    def _write(self, out) -> None:
        msg = out.msg
        key = out.request
        if key is not None and not self.replies.request_sent(key, self._addressed):
            return  # the request ended while it was buffered
        if self._addressed:
            if key is not None:
                frame = Message(msg.replace(reply_to=f"{self._reply_base}.{REPLY_TOKEN}.{key}"), key, out.hops)
            elif msg.reply_to is not None:
                frame = Message(msg.replace(reply_to=self._route(msg.reply_to)), None, out.hops)
            else:
                frame = Message(msg, None, out.hops)
        else:
            if key is None and out.hops:
                self.guard.sent_answer(msg.body, out.hops)
            frame = Message(msg)
        self._write_frame(frame)
        self.messages_out += 1

    def _route(self, local):
        """A reply subject at the server whose answer is published here on ``local``."""
        token = self.replies.route(local)
        return f"{self._reply_base}.{REPLY_TOKEN}.{token if token is not None else 'unroutable'}"

    def _write_frame(self, frame) -> None:
        payload, is_binary = self.codec.encode(frame)
        self.transport.write(payload, is_binary)
