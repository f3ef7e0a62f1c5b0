"""Client mode: outbound WebSocket links that reconnect, authenticate and do request/reply.

A *link* is one outbound WebSocket connection to a server URI, kept up by Twisted's
``ClientService`` (exponential backoff with full jitter, capped, forever by default).
Links are shared: every component link whose connection settings (URI, credentials,
headers, wire mode, TLS, timing, buffer) are equal uses the same connection, counted by
its owners; deleting the last owner closes it. See docs/client-mode.rst.

Each link is a session on the lattice, like a server-mode peer: its address
``<prefix>.session.<link id>`` (and ``address.>``) is subscribed, so anything published
there goes out over the link. What the server sends is published on the lattice for every
linked handler, with ``reply_to`` set to that address (or, in envelope mode, the server's
own ``reply_to``, whose replies are routed back over the link).

Wire modes: the ``wsprovider.v1.json`` envelope when the server accepts that subprotocol,
plain frames (``raw``) otherwise; ``WIRE_MODE`` forces either.

Why no ``prepareConnection``: with Twisted 26.10, ``ClientService`` raises
``NoTransition`` from ``connectionLost`` when a connection is lost while (or after)
``prepareConnection`` fails, which is exactly what a refused upgrade does. So the
service sees the TCP connection; the WebSocket handshake is bounded by a timer in the
protocol (the rest of ``CONNECT_TIMEOUT_SEC``), a failed handshake drops the connection,
and the retry policy counts failures itself (``ClientService`` would reset its count on
every TCP connect).
"""

from __future__ import annotations

import collections
import itertools
import random
import re
import secrets
import time
from functools import partial
from urllib.parse import urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from . import envelope, raw
from ._defer import mirror
from ._version import __version__
from .config import ConfigError
from .interfaces import IMessagingConsumer, ISessionRegistry
from .message import (BrokerMessage, BufferFull, MessagingError, NoResponders, NotConnected,
                      PermissionDenied, RequestTimeout)
from .subjects import SubjectError, check_subject

STOPPED = "stopped"
CONNECTING = "connecting"
CONNECTED = "connected"
BACKING_OFF = "backing_off"
FAILED = "failed"

DEFAULT_OWNER = "provider"

# Reply subjects a link mints for its requests and for forwarded reply_to subjects live at
# <the link's address at the server>._r.<n>, so they cannot clash with other subjects there.
_REPLY_TOKEN = "_r"
_MAX_OWED_REPLIES = 1024
_MAX_ROUTES = 4096

# The settings that make two links "the same connection".
CONNECTION_KEYS = ("URI", "AUTH_TOKEN", "WIRE_MODE", "CA_BUNDLE", "CONNECT_TIMEOUT_SEC", "RECONNECT_MIN_SEC",
                   "RECONNECT_MAX_SEC", "RECONNECT_MAX_ATTEMPTS", "OFFLINE_BUFFER_BYTES", "OUTBOUND_SUBJECTS",
                   "REMOTE_SUBSCRIPTIONS", "MAX_MESSAGE_SIZE", "PING_INTERVAL_SEC", "PING_TIMEOUT_SEC",
                   "SUBJECT_PREFIX", "MAX_REQUEST_TIMEOUT_MS")

_REMOTE_ERRORS = {
    NoResponders.code: NoResponders,
    PermissionDenied.code: PermissionDenied,
    RequestTimeout.code: RequestTimeout,
    NotConnected.code: NotConnected,
}


def target_owner(component_id: str) -> str:
    return "target:" + component_id


def source_owner(component_id: str) -> str:
    return "source:" + component_id


# -- configuration ----------------------------------------------------------------------

class Target:
    """Where a link connects: parsed and checked from ``URI``."""

    __slots__ = ("uri", "shown", "host", "port", "secure")

    def __init__(self, uri):
        if not uri:
            raise ConfigError("URI: client mode needs the WebSocket URL to connect to, e.g. ws://127.0.0.1:8080/ws "
                              "(in the provider config or in the link config)")
        uri = str(uri).strip()
        parts = urlsplit(uri)
        if parts.scheme not in ("ws", "wss"):
            raise ConfigError(f"URI: {uri!r} is not a WebSocket URL; in client mode accepted values: "
                              "ws://host:port/path or wss://host:port/path")
        if not parts.hostname:
            raise ConfigError(f"URI: {uri!r} has no host; accepted values: ws://host:port/path or wss://...")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"URI: {uri!r}: the port is not a number in 0..65535") from None
        self.uri = uri
        self.secure = parts.scheme == "wss"
        self.host = parts.hostname
        self.port = port or (443 if self.secure else 80)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = netloc.replace(":" + parts.password + "@", ":***@", 1)
        self.shown = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))


def upgrade_headers(config) -> dict:
    """``HEADER_<name>`` entries, plus ``Authorization: Bearer <AUTH_TOKEN>`` unless one is given."""
    headers = {}
    for name, value in config.headers.items():
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
            raise ConfigError(f"HEADER_{name}: {name!r} is not a valid HTTP header name")
        if "\r" in value or "\n" in value:
            raise ConfigError(f"HEADER_{name}: the value must not contain line breaks")
        headers[name] = value
    token = config.auth_token
    if token:
        if "\r" in token or "\n" in token:
            raise ConfigError("AUTH_TOKEN: must not contain line breaks")
        if not any(name.lower() == "authorization" for name in headers):
            headers["Authorization"] = f"Bearer {token}"
    return headers


def trust_root(ca_bundle):
    """The TLS trust root: the system's, or the certificates in the ``CA_BUNDLE`` PEM file."""
    from twisted.internet import ssl
    if not ca_bundle:
        return ssl.platformTrust()
    try:
        with open(ca_bundle, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"CA_BUNDLE: cannot read {ca_bundle!r}: {e.strerror or e}") from None
    pems = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", data, re.S)
    if not pems:
        raise ConfigError(f"CA_BUNDLE: {ca_bundle!r} holds no PEM certificate; accepted values: a PEM file "
                          "with one or more '-----BEGIN CERTIFICATE-----' blocks")
    try:
        return ssl.trustRootFromCertificates([ssl.Certificate.loadPEM(p) for p in pems])
    except Exception as e:
        raise ConfigError(f"CA_BUNDLE: {ca_bundle!r} holds a certificate that cannot be loaded: {e}") from None


def connection_key(config) -> tuple:
    values = config.as_dict()
    return tuple(values.get(k) for k in CONNECTION_KEYS) + (tuple(sorted(config.headers.items())),)


def check_link_config(config) -> Target:
    """Raise ``ConfigError`` if ``config`` cannot make a client link; return its target."""
    target = Target(config.uri)
    if config.reconnect_min_sec > config.reconnect_max_sec:
        raise ConfigError(f"RECONNECT_MIN_SEC: {config.reconnect_min_sec} is more than RECONNECT_MAX_SEC "
                          f"({config.reconnect_max_sec}); accepted values: up to RECONNECT_MAX_SEC")
    upgrade_headers(config)
    if config.ca_bundle and not target.secure:
        raise ConfigError(f"CA_BUNDLE: set, but URI {target.shown!r} is not wss://")
    if target.secure:
        trust_root(config.ca_bundle)
    return target


def full_jitter(failures: int, base: float, cap: float, rnd=random.random) -> float:
    """AWS "full jitter": uniform in 0..min(cap, base * 2^(failures-1))."""
    exponent = min(max(failures - 1, 0), 62)
    return rnd() * min(cap, base * (2 ** exponent))


# -- the WebSocket protocol and factory ---------------------------------------------------

class LinkProtocol(WebSocketClientProtocol):
    """One connection of a link. Everything interesting is delegated to the ``ClientLink``."""

    link = None
    wire = None
    codec = None
    error = None         # our own account of why this connection failed, preferred in last_error
    _timer = None

    def connectionMade(self):
        self.link = self.factory.link
        self.link._tcp_connected(self)
        WebSocketClientProtocol.connectionMade(self)

    def onOpen(self):
        self.link._ws_open(self)

    # IPushProducer, registered once the link is connected: while the transport's buffer is
    # full, the link holds messages in its bounded buffer instead of growing the transport's.
    def pauseProducing(self):
        self.link._paused = True

    def resumeProducing(self):
        if self.link._paused:
            self.link._paused = False
            self.link._flush()

    def stopProducing(self):
        pass

    def onMessage(self, payload, isBinary):
        self.link._frame(self, payload, isBinary)

    def onClose(self, wasClean, code, reason):
        if self.link is not None:
            self.link._ws_closed(self, wasClean, code, reason)

    def connectionLost(self, reason):
        WebSocketClientProtocol.connectionLost(self, reason)
        # Autobahn leaves its close-handshake timer behind when the TCP connection goes first.
        call = getattr(self, "closeHandshakeTimeoutCall", None)
        if call is not None:
            self.closeHandshakeTimeoutCall = None
            call.cancel()


class LinkFactory(WebSocketClientFactory):
    protocol = LinkProtocol
    noisy = False

    def __init__(self, link, target, config):
        offered = [] if config.wire_mode == "raw" else [envelope.JSON_PROTOCOL]
        WebSocketClientFactory.__init__(self, target.uri, protocols=offered or None,
                                        useragent=f"wsprovider/{__version__}",
                                        headers=upgrade_headers(config), reactor=link.reactor)
        self.link = link
        self.setProtocolOptions(
            maxMessagePayloadSize=config.max_message_size,
            maxFramePayloadSize=config.max_message_size,
            autoPingInterval=config.ping_interval_sec or None,
            autoPingTimeout=config.ping_timeout_sec if config.ping_interval_sec else None,
            openHandshakeTimeout=0,      # the link times the whole attempt itself
            closeHandshakeTimeout=2,
        )
        self.trackTimings = False


@implementer(IStreamClientEndpoint)
class _AttemptEndpoint:
    """Wraps the real endpoint to see every attempt begin and every TCP/TLS connect fail."""

    def __init__(self, link, endpoint):
        self._link = link
        self._endpoint = endpoint

    def connect(self, factory):
        self._link._attempt_begins()
        d = self._endpoint.connect(factory)
        d.addErrback(self._link._connect_failed)
        return d

    def __repr__(self):
        return f"<link {self._link.link_id} to {self._link.target.shown}>"


# -- one link -----------------------------------------------------------------------------

class _Outgoing:
    __slots__ = ("msg", "size", "request")

    def __init__(self, msg, request=None):
        self.msg = msg
        self.request = request
        self.size = len(msg.body) + len(msg.subject) + (len(msg.reply_to) if msg.reply_to else 0)


class _Request:
    __slots__ = ("deferred", "timer", "subject", "token", "outgoing", "timeout_ms")

    def __init__(self, subject, token, timeout_ms):
        self.subject = subject
        self.token = token
        self.timeout_ms = timeout_ms
        self.deferred = None
        self.timer = None
        self.outgoing = None


class _Route:
    """A reply subject on the lattice that a reply from the server must reach."""

    __slots__ = ("local", "deadline")

    def __init__(self, local, deadline):
        self.local = local
        self.deadline = deadline


class _Owed:
    """A reply subject at the server that handlers here may answer (lattice subscription)."""

    __slots__ = ("sub", "count", "timer")

    def __init__(self):
        self.sub = None
        self.count = 1
        self.timer = None


class ClientLink:
    """One outbound WebSocket connection, kept up by a ``ClientService``, and its session."""

    log = Logger()

    def __init__(self, manager, link_id, config, target=None):
        self.manager = manager
        self.lattice = manager.lattice
        self.reactor = manager.reactor
        self.config = config
        self.target = target or check_link_config(config)
        self.link_id = link_id
        self.address = f"{config.subject_prefix}.session.{link_id}"
        self.owners = set()
        self.state = STOPPED
        self.attempts = 0           # since the last time the link was connected
        self.failures = 0           # consecutive failed attempts (drives the backoff)
        self.connects = 0
        self.last_error = None
        self.connected_at = None
        self.next_retry_at = None
        self.messages_in = self.messages_out = 0
        self.remote_errors = 0
        self.protocol = None        # the open connection, when connected
        self.wire = None
        self.remote_session_id = None
        self.remote_reply_to = None
        self._reply_base = self.address
        self._connecting = None
        self._attempt_started = None
        self._buffer = collections.deque()
        self._buffered = 0
        self._replies = {}          # token -> _Request | _Route  (envelope replies)
        self._raw_waiters = collections.deque()
        self._ids = itertools.count(1)
        self._owed = {}
        self._subs = []
        self._gate = None
        self._gate_queue = collections.deque()
        self._inbound_current = None
        self._stopping = False
        self._stopped = None
        self._connected_waiters = []
        self._paused = False        # the transport asked us to stop writing (server reads slowly)
        self.factory = LinkFactory(self, self.target, config)
        endpoint = HostnameEndpoint(self.reactor, self.target.host, self.target.port,
                                    timeout=config.connect_timeout_sec)
        if self.target.secure:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = wrapClientTLS(optionsForClientTLS(self.target.host, trustRoot=trust_root(config.ca_bundle)),
                                     endpoint)
        self.service = ClientService(_AttemptEndpoint(self, endpoint), self.factory,
                                     retryPolicy=self._retry_delay, clock=self.reactor)

    # -- lifecycle ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        """Subscribe the link's lattice subjects, then start connecting. Deferred."""
        patterns = [(self.address, self._from_address), (self.address + ".>", self._from_address)]
        patterns += [(p, self._from_outbound) for p in self.config.outbound_subjects]
        for pattern, callback in patterns:
            sub = yield self.lattice.subscribe(pattern, callback)
            if self._stopping:
                sub.unsubscribe()
                return self
            self._subs.append(sub)
        self.log.info("client link {link} to {uri}: starting (wire mode {wire}, lattice address {address})",
                      link=self.link_id, uri=self.target.shown, wire=self.config.wire_mode, address=self.address)
        self.service.startService()
        return self

    def stop(self, reason="the link was deleted"):
        """Close the connection and stop reconnecting. Deferred firing when it is closed."""
        if self._stopped is not None:
            return mirror(self._stopped)
        self._stopping = True
        for sub in self._subs:
            sub.unsubscribe()
        self._subs = []
        proto = self.protocol
        if proto is not None and proto.state == proto.STATE_OPEN:
            closed = defer.Deferred()
            proto.is_closed.addBoth(lambda _: closed.callback(None) if not closed.called else None)
            proto.sendClose(1000, reason[:100])
        else:
            closed = defer.succeed(None)
        self._stopped = closed.addCallback(lambda _: self.service.stopService()).addCallback(self._finished, reason)
        return mirror(self._stopped)

    def when_connected(self):
        """Deferred firing with this link once it is connected (at once if it is); fails with
        ``NotConnected`` if the link is closed or gives up first."""
        if self.protocol is not None:
            return defer.succeed(self)
        refused = self._not_sending()
        if refused is not None:
            return defer.fail(refused)
        d = defer.Deferred()
        self._connected_waiters.append(d)
        return d

    def _wake_waiters(self, error=None):
        waiters, self._connected_waiters = self._connected_waiters, []
        for d in waiters:
            if error is None:
                d.callback(self)
            else:
                d.errback(error)

    def _finished(self, _, reason):
        self._wake_waiters(NotConnected(f"client link {self.link_id} to {self.target.shown} is closed: {reason}"))
        if self.state != FAILED:
            self.state = STOPPED
        self.next_retry_at = None
        self._connection_gone(NotConnected(f"client link {self.link_id} to {self.target.shown} is closed: {reason}"))
        self._drop_buffer(reason)
        self.log.info("client link {link} to {uri}: closed ({reason})", link=self.link_id, uri=self.target.shown,
                      reason=reason)
        return None

    def _drop_buffer(self, reason):
        dropped = 0
        while self._buffer:
            out = self._buffer.popleft()
            if out.request is not None:
                self._fail_request(out.request, NotConnected(
                    f"request to {out.request.subject!r} not sent: client link {self.link_id} {reason}"))
            else:
                dropped += 1
        self._buffered = 0
        if dropped:
            self.log.warn("client link {link} to {uri}: {n} buffered message(s) were never sent: {reason}",
                          link=self.link_id, uri=self.target.shown, n=dropped, reason=reason)

    def drop(self, code=1000, reason="closed by the service"):
        """Close the current connection; the link reconnects after its backoff."""
        proto = self.protocol or self._connecting
        if proto is None:
            return False
        if proto.state == proto.STATE_OPEN:
            proto.sendClose(code, reason)
        else:
            proto.error = reason
            proto.transport.abortConnection()
        return True

    # -- connection attempts (called by the endpoint, protocol and ClientService) ---------

    def _attempt_begins(self):
        self.attempts += 1
        self.state = CONNECTING
        self.next_retry_at = None
        self._attempt_started = self.reactor.seconds()
        self.log.info("client link {link} to {uri}: connecting (attempt {attempt})", link=self.link_id,
                      uri=self.target.shown, attempt=self.attempts)

    def _connect_failed(self, failure):
        if failure.check(defer.CancelledError) or self._stopping:
            return failure
        self.failures += 1
        err = failure.value
        text = failure.getErrorMessage() or type(err).__name__
        self.last_error = f"cannot connect to {self.target.host}:{self.target.port}: {text}"
        self.log.warn("client link {link} to {uri}: {error}", link=self.link_id, uri=self.target.shown,
                      error=self.last_error)
        return failure

    def _tcp_connected(self, proto):
        self._connecting = proto
        spent = self.reactor.seconds() - (self._attempt_started or self.reactor.seconds())
        proto._timer = self.reactor.callLater(max(self.config.connect_timeout_sec - spent, 0.001),
                                              self._handshake_timeout, proto)

    def _handshake_timeout(self, proto):
        proto._timer = None
        phase = "welcome frame" if proto.wire == "envelope" else "WebSocket opening handshake"
        proto.error = (f"timed out: no {phase} from {self.target.host}:{self.target.port} within "
                       f"CONNECT_TIMEOUT_SEC={self.config.connect_timeout_sec:g}s")
        proto.transport.abortConnection()

    def _ws_open(self, proto):
        chosen = proto.websocket_protocol_in_use
        if chosen == envelope.JSON_PROTOCOL:
            proto.wire = "envelope"
            proto.codec = envelope.CODECS[chosen]
            return  # connected once the server's welcome frame arrives
        if self.config.wire_mode == "envelope":
            proto.error = (f"the server did not accept the {envelope.JSON_PROTOCOL} subprotocol, which "
                           "WIRE_MODE=envelope requires; use WIRE_MODE=auto or raw for an ordinary WebSocket server")
            proto.sendClose(1000, "subprotocol required")
            return
        proto.wire = "raw"
        self._ready(proto)

    def _ready(self, proto, welcome=None):
        if proto._timer is not None:
            proto._timer.cancel()
            proto._timer = None
        self._connecting = None
        if self._stopping:
            proto.sendClose(1000, "the link was deleted")
            return
        self.protocol = proto
        self.wire = proto.wire
        self._paused = False
        proto.transport.registerProducer(proto, True)
        self.state = CONNECTED
        self.connects += 1
        # self.failures is settled when this connection ends: one that does not stay up
        # for RECONNECT_MAX_SEC keeps the backoff growing (a server that accepts and hangs
        # up at once must not be hammered).
        self.attempts = 0
        self.connected_at = time.time()
        if welcome is not None:
            self.remote_session_id = welcome.get("session_id")
            self.remote_reply_to = welcome.get("reply_to")
        else:
            self.remote_session_id = self.remote_reply_to = None
        self._reply_base = self.remote_reply_to or self.address
        self.log.info("client link {link} to {uri}: connected ({wire} frames{session})", link=self.link_id,
                      uri=self.target.shown, wire=self.wire,
                      session=f", session {self.remote_session_id}" if self.remote_session_id else "")
        if self.wire == "envelope":
            for pattern in self.config.remote_subscriptions:
                proto.sendMessage(proto.codec.control("subscribe", subject=pattern), False)
        self._flush()
        self._wake_waiters()

    def _ws_closed(self, proto, was_clean, code, reason):
        if proto._timer is not None:
            proto._timer.cancel()
            proto._timer = None
        if proto is self.protocol:
            lived = time.time() - self.connected_at if self.connected_at is not None else 0.0
            self.protocol = None
            self.connected_at = None
            self._paused = False
            if self._stopping:
                return
            if lived >= self.config.reconnect_max_sec:
                self.failures = 0
            self.failures += 1
            self.last_error = proto.error or _close_text(proto, code, reason, opened=True)
            self.log.warn("client link {link} to {uri}: connection lost: {error}", link=self.link_id,
                          uri=self.target.shown, error=self.last_error)
            self._connection_gone(NotConnected(
                f"client link {self.link_id} to {self.target.shown} was lost before the reply arrived"))
            return
        if proto is self._connecting:
            self._connecting = None
        if self._stopping:
            return
        self.failures += 1
        self.last_error = proto.error or _close_text(proto, code, reason, opened=False)
        self.log.warn("client link {link} to {uri}: attempt {attempt} failed: {error}", link=self.link_id,
                      uri=self.target.shown, attempt=self.attempts, error=self.last_error)

    def _retry_delay(self, _attempts_seen_by_client_service):
        config = self.config
        if config.reconnect_max_attempts and self.failures >= config.reconnect_max_attempts:
            self.reactor.callLater(0, self._give_up)
            return 3600.0  # never waited for: _give_up stops the service first
        delay = full_jitter(self.failures, config.reconnect_min_sec, config.reconnect_max_sec)
        if not self._stopping:
            self.state = BACKING_OFF
            self.next_retry_at = self.reactor.seconds() + delay
            self.log.info("client link {link} to {uri}: backing off, retrying in {delay:.3f}s "
                          "({failures} failed attempt(s) in a row)", link=self.link_id, uri=self.target.shown,
                          delay=delay, failures=self.failures)
        return delay

    def _give_up(self):
        if self._stopping or self.state == FAILED:
            return
        self.state = FAILED
        self.next_retry_at = None
        self.log.error("client link {link} to {uri}: giving up after {n} failed attempts "
                       "(RECONNECT_MAX_ATTEMPTS); last error: {error}", link=self.link_id, uri=self.target.shown,
                       n=self.failures, error=self.last_error)
        self.service.stopService()
        self._drop_buffer(f"gave up after {self.failures} failed attempts")
        self._wake_waiters(self._not_sending())

    # -- outbound ---------------------------------------------------------------------

    def _not_sending(self):
        if self.state == FAILED:
            return NotConnected(f"client link {self.link_id} to {self.target.shown} gave up after "
                                f"{self.failures} failed attempts (last error: {self.last_error})")
        if self._stopping:
            return NotConnected(f"client link {self.link_id} to {self.target.shown} is closed")
        return None

    def send(self, msg):
        """Send ``msg`` to the server now, or buffer it while the link is down. Deferred."""
        refused = self._not_sending()
        if refused is not None:
            return defer.fail(refused)
        out = _Outgoing(self._map_own_address(msg))
        if not self._buffer and self._writable():
            self._write(out)
            return defer.succeed(None)
        refused = self._enqueue(out)
        return defer.succeed(None) if refused is None else defer.fail(refused)

    def request(self, subject, body, timeout_ms):
        try:
            check_subject(subject)
        except SubjectError as e:
            return defer.fail(MessagingError(str(e), code="bad_subject"))
        if type(timeout_ms) is not int or timeout_ms <= 0:
            return defer.fail(MessagingError(f"timeout_ms must be a positive integer, got {timeout_ms!r}",
                                             code="bad_request"))
        refused = self._not_sending()
        if refused is not None:
            return defer.fail(refused)
        req = _Request(subject, str(next(self._ids)), timeout_ms)
        req.deferred = defer.Deferred(lambda d: self._forget_request(req))
        req.outgoing = _Outgoing(BrokerMessage(subject, body), req)
        req.timer = self.reactor.callLater(timeout_ms / 1000.0, self._request_timed_out, req)
        if not self._buffer and self._writable():
            self._write(req.outgoing)
        else:
            refused = self._enqueue(req.outgoing)
            if refused is not None:
                req.timer.cancel()
                return defer.fail(refused)
        return req.deferred

    def _writable(self) -> bool:
        proto = self.protocol
        return proto is not None and not self._paused and proto.state == proto.STATE_OPEN

    def _enqueue(self, out):
        """Buffer ``out`` while the link is down; return None, or the ``BufferFull`` refusing it."""
        limit = self.config.offline_buffer_bytes
        if self._buffered + out.size > limit:
            why = ("connected but the server is not reading fast enough" if self.protocol is not None
                   else self.state.replace("_", " "))
            return BufferFull(
                f"client link {self.link_id} to {self.target.shown} is {why}, and its "
                f"offline buffer is full ({len(self._buffer)} message(s), {self._buffered} of "
                f"OFFLINE_BUFFER_BYTES={limit} bytes; this one needs {out.size}); the message was not accepted")
        self._buffer.append(out)
        self._buffered += out.size
        return None

    def _flush(self):
        buffer = self._buffer
        while buffer and self._writable():
            out = buffer.popleft()
            self._buffered -= out.size
            self._write(out)

    def _write(self, out):
        proto = self.protocol
        msg = out.msg
        req = out.request
        if self.wire == "raw":
            payload, binary = raw.encode(msg)
            if req is not None:
                self._raw_waiters.append(req)
            proto.sendMessage(payload, binary)
        else:
            reply_to = msg.reply_to
            frame_id = None
            if req is not None:
                self._replies[req.token] = req
                reply_to = f"{self._reply_base}.{_REPLY_TOKEN}.{req.token}"
                frame_id = req.token
            elif reply_to is not None:
                token = str(next(self._ids))
                self._add_route(token, reply_to)
                reply_to = f"{self._reply_base}.{_REPLY_TOKEN}.{token}"
            proto.sendMessage(proto.codec.message(BrokerMessage(msg.subject, msg.body, reply_to),
                                                  frame_id=frame_id), False)
        self.messages_out += 1

    def _add_route(self, token, local):
        routes = self._replies
        if len(routes) >= _MAX_ROUTES:
            now = self.reactor.seconds()
            for key in [k for k, v in routes.items() if isinstance(v, _Route) and v.deadline < now]:
                del routes[key]
            while len(routes) >= _MAX_ROUTES:
                key = next((k for k, v in routes.items() if isinstance(v, _Route)), None)
                if key is None:
                    break
                del routes[key]
        routes[token] = _Route(local, self.reactor.seconds() + self.config.max_request_timeout_ms / 1000.0)

    def _map_own_address(self, msg):
        """A message to this link's address goes to the server as 'message'; to address.X as X."""
        subject = msg.subject
        address = self.address
        if subject == address:
            return msg.replace(subject=envelope.PLAIN_TEXT_SUBJECT)
        if subject.startswith(address) and subject[len(address)] == ".":
            return msg.replace(subject=subject[len(address) + 1:])
        return msg

    # requests

    def _request_timed_out(self, req):
        req.timer = None
        self._forget_request(req)
        if not req.deferred.called:
            req.deferred.errback(RequestTimeout(
                f"request to {req.subject!r} over client link {self.link_id} ({self.target.shown}) timed out "
                f"after {req.timeout_ms}ms"))

    def _forget_request(self, req):
        if req.timer is not None and req.timer.active():
            req.timer.cancel()
        req.timer = None
        if self._replies.get(req.token) is req:
            del self._replies[req.token]
        try:
            self._raw_waiters.remove(req)
        except ValueError:
            pass
        out = req.outgoing
        if out is not None:
            try:
                self._buffer.remove(out)
            except ValueError:
                pass
            else:
                self._buffered -= out.size

    def _fail_request(self, req, error):
        self._forget_request(req)
        if not req.deferred.called:
            req.deferred.errback(error)

    def _answer_request(self, req, msg):
        self._forget_request(req)
        if not req.deferred.called:
            req.deferred.callback(msg)

    def pending_requests(self) -> int:
        return sum(1 for v in self._replies.values() if isinstance(v, _Request)) + len(self._raw_waiters)

    def _connection_gone(self, error):
        replies, self._replies = self._replies, {}
        for entry in replies.values():
            if isinstance(entry, _Request):
                self._fail_request(entry, error)
            else:
                self.lattice.fail_reply(entry.local, error)  # in ILattice
        while self._raw_waiters:
            self._fail_request(self._raw_waiters[0], error)
        for subject in list(self._owed):
            self._drop_owed(subject)

    # -- lattice -> link ----------------------------------------------------------------

    def _from_address(self, msg):
        return self.send(msg)

    def _from_outbound(self, msg):
        if msg is self._inbound_current:
            return None  # it just came from this server: do not echo it back
        return self.send(msg)

    def _owed_reply(self, subject, msg):
        entry = self._owed.get(subject)
        if entry is not None:
            entry.count -= 1
            if entry.count <= 0:
                self._drop_owed(subject)
        return self.send(msg)

    def _owe(self, subject):
        """Route replies to the server's ``subject`` back over the link. None, or a Deferred to wait for."""
        ttl = self.config.max_request_timeout_ms / 1000.0
        entry = self._owed.get(subject)
        if entry is not None:
            entry.count += 1
            entry.timer.reset(ttl)
            return None
        while len(self._owed) >= _MAX_OWED_REPLIES:
            self._drop_owed(next(iter(self._owed)))
        entry = self._owed[subject] = _Owed()
        entry.timer = self.reactor.callLater(ttl, self._drop_owed, subject)

        def subscribed(sub):
            if self._owed.get(subject) is entry:
                entry.sub = sub
            else:
                sub.unsubscribe()

        def failed(failure):
            self.log.warn("client link {link}: cannot route replies to {subject}: {error}", link=self.link_id,
                          subject=subject, error=failure.getErrorMessage())

        d = self.lattice.subscribe(subject, partial(self._owed_reply, subject))
        d.addCallbacks(subscribed, failed)
        return None if d.called else d

    def _drop_owed(self, subject):
        entry = self._owed.pop(subject, None)
        if entry is None:
            return
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        if entry.sub is not None:
            entry.sub.unsubscribe()

    # -- server -> lattice ----------------------------------------------------------------

    def _frame(self, proto, payload, is_binary):
        if proto.wire == "raw":
            self.messages_in += 1
            self._inbound_raw(payload, is_binary)
            return
        codec = proto.codec
        try:
            obj = codec.loads(payload, is_binary)
        except envelope.FrameError as e:
            self.log.warn("client link {link}: unusable frame from the server: {error}", link=self.link_id, error=e)
            return
        if obj is None:  # plain text or binary frame: as in raw mode
            self._deliver(proto, raw.decode(payload, is_binary))
            return
        if type(obj) is not dict:
            self.log.warn("client link {link}: unusable frame from the server: not an object", link=self.link_id)
            return
        kind = obj.get("type", envelope.MESSAGE)
        if kind == "welcome" and proto is not self.protocol:
            self._ready(proto, obj)
            return
        if kind in (envelope.MESSAGE, "reply"):
            try:
                msg = codec._message(obj, obj.get("id"))
            except envelope.FrameError as e:
                self.log.warn("client link {link}: unusable message frame from the server: {error}",
                              link=self.link_id, error=e)
                return
            self._deliver(proto, msg)
        elif kind == "error":
            self._remote_error(obj)
        elif kind in ("subscribed", "unsubscribed", "pong", "welcome"):
            self.log.debug("client link {link}: {kind} {subject}", link=self.link_id, kind=kind,
                           subject=obj.get("subject", ""))
        else:
            self.log.warn("client link {link}: ignoring a frame of unknown type {kind!r} from the server",
                          link=self.link_id, kind=kind)

    def _deliver(self, proto, msg):
        if proto is not self.protocol:
            if proto is not self._connecting:
                return
            self._ready(proto)  # a server that speaks the envelope without a welcome frame
            if proto is not self.protocol:
                return
        self.messages_in += 1
        subject = msg.subject
        base = self._reply_base
        if subject.startswith(base) and subject[len(base):len(base) + len(_REPLY_TOKEN) + 2] == f".{_REPLY_TOKEN}.":
            token = subject[len(base) + len(_REPLY_TOKEN) + 2:]
            entry = self._replies.pop(token, None)
            if isinstance(entry, _Request):
                self._answer_request(entry, msg)
            elif isinstance(entry, _Route):
                self._to_lattice(msg.replace(subject=entry.local))
            else:
                self.log.info("client link {link}: a reply on {subject} came after its request ended; dropped",
                              link=self.link_id, subject=subject)
            return
        if subject == base:
            msg = msg.replace(subject=envelope.PLAIN_TEXT_SUBJECT)
        elif subject.startswith(base) and subject[len(base)] == ".":
            msg = msg.replace(subject=subject[len(base) + 1:])
        self._to_lattice(msg)

    def _inbound_raw(self, payload, is_binary):
        if self._raw_waiters:
            self._answer_request(self._raw_waiters[0], raw.decode(payload, is_binary))
            return
        self._to_lattice(raw.decode(payload, is_binary, self.address))

    def _remote_error(self, obj):
        self.remote_errors += 1
        code = str(obj.get("code", "error"))
        text = str(obj.get("message", ""))
        frame_id = obj.get("id")
        entry = self._replies.get(str(frame_id)) if frame_id is not None else None
        if isinstance(entry, _Request):
            cls = _REMOTE_ERRORS.get(code)
            message = f"the server answered the request to {entry.subject!r} with {code}: {text}"
            self._fail_request(entry, cls(message) if cls else MessagingError(message, code=code))
            return
        self.log.warn("client link {link} to {uri}: the server reported {code}: {message}", link=self.link_id,
                      uri=self.target.shown, code=code, message=text)

    def _to_lattice(self, msg):
        if self._gate is not None:
            self._gate_queue.append(msg)
            return
        self._to_lattice_now(msg)

    def _to_lattice_now(self, msg):
        if msg.reply_to is None:
            msg.reply_to = self.address
            waiting = None
        elif msg.reply_to == self.address or msg.reply_to.startswith(self.address + "."):
            waiting = None
        else:
            waiting = self._owe(msg.reply_to)
        if waiting is None:
            self._publish_inbound(msg)
            return
        # An asynchronous lattice: hold this and later messages until replies can be routed.
        self._gate = waiting

        def go(_):
            self._publish_inbound(msg)
            self._gate = None
            while self._gate_queue and self._gate is None:
                self._to_lattice_now(self._gate_queue.popleft())

        waiting.addBoth(go)

    def _publish_inbound(self, msg):
        self._inbound_current = msg
        try:
            d = self.lattice.publish(msg)
        finally:
            self._inbound_current = None
        if not (d.called and d.result is None):
            d.addErrback(self._not_handled, msg.subject)

    def _not_handled(self, failure, subject):
        self.log.warn("client link {link}: a message from {uri} on {subject!r} was not handled: {error}",
                      link=self.link_id, uri=self.target.shown, subject=subject, error=failure.getErrorMessage())

    # -- introspection --------------------------------------------------------------------

    def describe(self) -> dict:
        proto = self.protocol
        retry_in = None
        if self.state == BACKING_OFF and self.next_retry_at is not None:
            retry_in = round(max(self.next_retry_at - self.reactor.seconds(), 0.0), 3)
        return {
            "session_id": self.link_id,
            "address": self.address,
            "mode": "client",
            "uri": self.target.shown,
            "state": self.state,
            "attempts": self.attempts,
            "connects": self.connects,
            "last_error": self.last_error,
            "retry_in": retry_in,
            "connected_at": self.connected_at,
            "peer": f"{self.target.host}:{self.target.port}",
            "wire_mode": self.wire if proto is not None else None,
            "subprotocol": proto.websocket_protocol_in_use if proto is not None else None,
            "remote_session_id": self.remote_session_id if proto is not None else None,
            "remote_reply_to": self.remote_reply_to if proto is not None else None,
            "subscriptions": list(self.config.remote_subscriptions),
            "links": sorted(self.owners),
            "buffered_messages": len(self._buffer),
            "buffered_bytes": self._buffered,
            "pending_requests": self.pending_requests(),
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
        }


def _close_text(proto, code, reason, opened):
    """A readable account of why a connection ended."""
    detail = proto.wasNotCleanReason or ""
    m = re.search(r"upgrade failed \[(\d{3})\]: ?(.*)", detail)
    if m:
        status, phrase = int(m.group(1)), m.group(2).strip()
        hint = ""
        if status in (401, 403):
            hint = " (check AUTH_TOKEN / HEADER_Authorization)"
        elif status == 404:
            hint = " (check the path in URI)"
        return f"the server refused the WebSocket upgrade: HTTP {status} {phrase}{hint}".rstrip()
    if detail:
        prefix = "connection lost" if opened else "WebSocket handshake failed"
        return f"{prefix}: {detail}"
    if opened:
        return f"the server closed the connection (code {code}{': ' + reason if reason else ''})"
    return f"WebSocket handshake failed (code {code}{': ' + reason if reason else ''})"


# -- the registry of links ----------------------------------------------------------------

@implementer(IMessagingConsumer, ISessionRegistry)
class ClientLinks:
    """Client mode's consumer and session registry: the provider's ``ws`` in client mode.

    Links are keyed by their connection settings (``connection_key``) and owned by link
    names (``"provider"`` for the provider's own ``URI``, ``"target:<component>"``,
    ``"source:<component>"``); a link lives while it has an owner.
    """

    log = Logger()

    def __init__(self, lattice, config, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.lattice = lattice
        self.config = config
        self.links: dict[str, ClientLink] = {}
        self._by_key: dict[tuple, ClientLink] = {}
        self._owners: dict[str, ClientLink] = {}
        self._starting: dict[str, defer.Deferred] = {}
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self):
        """Open the provider's own link if ``URI`` is set. Deferred (does not wait for the connection)."""
        if not self.config.uri:
            self.log.info("client mode without a provider URI: links connect when components are linked "
                          "with a URI of their own")
            return defer.succeed(None)
        link = self.attach(DEFAULT_OWNER, self.config)
        return self.when_started(link)

    def when_started(self, link):
        d = self._starting.get(link.link_id)
        return defer.succeed(link) if d is None else mirror(d)

    def stop(self):
        self._stopped = True
        links = list(self.links.values())
        self.links.clear()
        self._by_key.clear()
        self._owners.clear()
        return defer.DeferredList([link.stop("the service is shutting down") for link in links],
                                  consumeErrors=True)

    def attach(self, owner: str, config=None) -> ClientLink:
        """Give ``owner`` a link for ``config`` (the provider's config merged with the link's).

        Raises ``ConfigError`` if the config cannot make a link. Shares an existing link with
        equal connection settings.
        """
        config = self.config if config is None else config
        if self._stopped:
            raise NotConnected("client mode is stopped")
        key = connection_key(config)
        old = self._owners.get(owner)
        if old is not None and old is self._by_key.get(key):
            return old
        link = self._by_key.get(key)
        if link is None:
            target = check_link_config(config)
            link = ClientLink(self, self._new_id(), config, target)
            self.links[link.link_id] = link
            self._by_key[key] = link
            starting = link.start()
            if not starting.called:
                self._starting[link.link_id] = starting
                starting.addBoth(self._started, link.link_id)
            elif isinstance(starting.result, Failure):
                starting.addErrback(self._start_failed, link)
        if old is not None:
            self.detach(owner)
        link.owners.add(owner)
        self._owners[owner] = link
        if len(link.owners) > 1:
            self.log.info("client link {link} to {uri}: shared by {owners}", link=link.link_id,
                          uri=link.target.shown, owners=", ".join(sorted(link.owners)))
        return link

    def _started(self, result, link_id):
        self._starting.pop(link_id, None)
        if isinstance(result, Failure):
            self._start_failed(result, self.links.get(link_id))
        return result

    def _start_failed(self, failure, link):
        self.log.error("client link {link}: cannot subscribe its subjects on the lattice: {error}",
                       link=getattr(link, "link_id", "?"), error=failure.getErrorMessage())
        return failure

    def _new_id(self) -> str:
        while True:
            link_id = secrets.token_urlsafe(12)
            if link_id not in self.links:
                return link_id

    def detach(self, owner: str):
        """Release ``owner``'s link; close it if nobody else uses it. Deferred firing with True if it closed."""
        link = self._owners.pop(owner, None)
        if link is None:
            return defer.succeed(False)
        link.owners.discard(owner)
        if link.owners:
            return defer.succeed(False)
        self.links.pop(link.link_id, None)
        for key, value in list(self._by_key.items()):
            if value is link:
                del self._by_key[key]
        return link.stop(f"its last link ({owner}) was deleted").addCallback(lambda _: True)

    def owner_link(self, owner: str):
        return self._owners.get(owner)

    def link_for(self, component_id: str | None = None) -> ClientLink:
        """The link a component's messages use: its own, else the provider's, else the only one."""
        if component_id is not None:
            for owner in (target_owner(component_id), source_owner(component_id)):
                link = self._owners.get(owner)
                if link is not None:
                    return link
        link = self._owners.get(DEFAULT_OWNER)
        if link is not None:
            return link
        if len(self.links) == 1:
            return next(iter(self.links.values()))
        if not self.links:
            raise NotConnected("no client link is configured: give the provider a URI, or link the component "
                               "with receive_link_config_as_target(component_id, {'URI': 'ws://...'})")
        raise NotConnected(f"{len(self.links)} client links are open and component {component_id!r} has none of "
                           "its own; link it with receive_link_config_as_target first")

    # -- IMessagingConsumer ---------------------------------------------------------------

    def publish(self, msg, component_id=None):
        try:
            link = self.link_for(component_id)
        except MessagingError as e:
            return defer.fail(e)
        return link.send(msg)

    def request(self, subject, body, timeout_ms, component_id=None):
        try:
            link = self.link_for(component_id)
        except MessagingError as e:
            return defer.fail(e)
        return link.request(subject, body, timeout_ms)

    # -- ISessionRegistry -------------------------------------------------------------------

    def list_sessions(self):
        return [link.describe() for link in self.links.values()]

    def session_address(self, session_id: str) -> str:
        return f"{self.config.subject_prefix}.session.{session_id}"

    def send_to_session(self, session_id, msg):
        link = self.links.get(session_id)
        if link is None:
            return defer.fail(NotConnected(f"no client link {session_id!r}; known links: "
                                           f"{', '.join(self.links) or '(none)'}"))
        return link.send(msg)

    def broadcast(self, msg):
        """Send ``msg`` over every link (sent or buffered). Deferred firing with the count."""
        results = [link.send(msg) for link in list(self.links.values())]
        return defer.DeferredList(results, consumeErrors=True).addCallback(
            lambda outcome: sum(1 for ok, _ in outcome if ok))

    def disconnect(self, session_id, code=1000, reason="closed by the service"):
        """Drop a link's current connection (it reconnects after its backoff). Deferred(bool)."""
        link = self.links.get(session_id)
        return defer.succeed(link.drop(code, reason) if link is not None else False)

