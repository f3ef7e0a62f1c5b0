"""Client mode: outbound WebSocket links that reconnect, authenticate and do request/reply.

A *link* is one outbound WebSocket connection to a server URI. Three pieces make one, each
in its own module and tested on its own:

* ``connector.Connector``: the state machine that keeps the connection up (exponential
  backoff with full jitter, capped, forever by default; one attempt counter);
* ``link.LinkCore``: the sans-IO session side (frames <-> lattice messages, reply routing,
  owed replies, requests, the outbound buffer, loop protection);
* ``LinkProtocol`` / ``LinkFactory`` here: the thin Autobahn adapter, and ``ClientLink``
  which wires the three together for one set of connection settings.

Links are shared: every component link whose connection settings (URI, credentials,
headers, wire mode, TLS, timing, buffer) are equal uses the same connection, counted by
its owners; deleting the last owner closes it. See docs/client-mode.rst.

Each link is a session on the lattice, like a server-mode peer: its address
``<prefix>.session.<link id>`` (and ``address.>``) is subscribed, so anything published
there goes out over the link. What the server sends is published on the lattice for every
linked handler, with ``reply_to`` set to that address (or, in envelope mode, the server's
own ``reply_to``, whose replies are routed back over the link).

Wire modes: the ``wsprovider.v1.json`` envelope when the server accepts that subprotocol,
plain frames (``raw``, ``raw.RawCodec``) otherwise; ``WIRE_MODE`` forces either.

Why not Twisted's ``ClientService(prepareConnection=...)``: see ``connector``'s docstring
(it raises ``NoTransition`` when a connection drops while the handshake is pending).
"""

from __future__ import annotations

import random
import re
import secrets
import time
from functools import partial
from urllib.parse import urlsplit, urlunsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger
from zope.interface import implementer

from . import envelope
from ._defer import failure_if_failed, mirror
from ._version import __version__
from .config import ConfigError
from .connector import BACKING_OFF, CONNECTED, CONNECTING, FAILED, STOPPED, Connector, IConnectorHooks  # noqa: F401
from .interfaces import IMessagingConsumer, ISessionRegistry
from .link import ILinkTransport, LinkCore
from .message import MessagingError, NotConnected
from .raw import RAW_CODEC

DEFAULT_OWNER = "provider"

# The settings that make two links "the same connection".
CONNECTION_KEYS = ("URI", "AUTH_TOKEN", "WIRE_MODE", "CA_BUNDLE", "CONNECT_TIMEOUT_SEC", "RECONNECT_MIN_SEC",
                   "RECONNECT_MAX_SEC", "RECONNECT_MAX_ATTEMPTS", "OFFLINE_BUFFER_BYTES", "OUTBOUND_SUBJECTS",
                   "REMOTE_SUBSCRIPTIONS", "MAX_MESSAGE_SIZE", "PING_INTERVAL_SEC", "PING_TIMEOUT_SEC",
                   "SUBJECT_PREFIX", "MAX_REQUEST_TIMEOUT_MS", "MAX_REPLY_HOPS", "MAX_ANSWERS_PER_SEC")


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


# -- the WebSocket protocol and factory: a thin adapter ------------------------------------

@implementer(ILinkTransport)
class LinkProtocol(WebSocketClientProtocol):
    """One connection of a link: hands every event to its ``ClientLink``; decides nothing."""

    link = None
    paused = False

    def connectionMade(self):
        self.link = self.factory.link
        WebSocketClientProtocol.connectionMade(self)

    def onOpen(self):
        self.link.opened(self)

    def onMessage(self, payload, isBinary):
        self.link.received(self, payload, isBinary)

    def onClose(self, wasClean, code, reason):
        if self.link is not None:
            self.link.closed(self, _close_text(self, code, reason))

    def connectionLost(self, reason):
        WebSocketClientProtocol.connectionLost(self, reason)
        # Autobahn leaves its close-handshake timer behind when the TCP connection goes first;
        # the attribute only exists once Autobahn started a close handshake, hence getattr.
        call = getattr(self, "closeHandshakeTimeoutCall", None)
        if call is not None:
            self.closeHandshakeTimeoutCall = None
            call.cancel()

    # ILinkTransport
    def write(self, payload, is_binary):
        self.sendMessage(payload, is_binary)

    def writable(self):
        return not self.paused and self.state == self.STATE_OPEN

    # IPushProducer, registered once the link is connected: while the transport's buffer is
    # full, the link holds messages in its bounded buffer instead of growing the transport's.
    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        if self.paused:
            self.paused = False
            self.link.resumed(self)

    def stopProducing(self):
        pass


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
            openHandshakeTimeout=0,      # the connector times the whole attempt
            closeHandshakeTimeout=2,
        )
        self.trackTimings = False


def _close_text(proto, code, reason):
    """A readable account of why a connection ended."""
    opened = proto.link is not None and proto.link.core.transport is proto and proto.link.core.ready
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


# -- one link -------------------------------------------------------------------------------

@implementer(IConnectorHooks)
class ClientLink:
    """One outbound WebSocket connection and its session: a ``Connector`` keeps it up, a
    ``LinkCore`` does the messaging, ``LinkProtocol`` carries it."""

    log = Logger()

    def __init__(self, manager, link_id, config, target=None):
        self.lattice = manager.lattice
        self.reactor = manager.reactor
        self.config = config
        self.target = target or check_link_config(config)
        self.link_id = link_id
        self.address = f"{config.subject_prefix}.session.{link_id}"
        self.owners = set()
        self.name = f"client link {link_id} to {self.target.shown}"
        self.connected_at = None
        self.core = LinkCore(self.lattice, self.reactor, config, self.name, self.address, self.log)
        self._subs = []
        self._closing = None
        self._connected_waiters = []
        endpoint = HostnameEndpoint(self.reactor, self.target.host, self.target.port,
                                    timeout=config.connect_timeout_sec)
        if self.target.secure:
            from twisted.internet.ssl import optionsForClientTLS
            endpoint = wrapClientTLS(optionsForClientTLS(self.target.host, trustRoot=trust_root(config.ca_bundle)),
                                     endpoint)
        self.connector = Connector(
            endpoint, LinkFactory(self, self.target, config), self.reactor, self,
            partial(full_jitter, base=config.reconnect_min_sec, cap=config.reconnect_max_sec),
            connect_timeout=config.connect_timeout_sec, stable_after=config.reconnect_max_sec,
            max_attempts=config.reconnect_max_attempts, name=self.name,
            peer=f"{self.target.host}:{self.target.port}", log=self.log)

    state = property(lambda self: self.connector.state)

    # -- lifecycle ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        """Subscribe the link's lattice subjects, then start connecting. Deferred."""
        core = self.core
        patterns = [(self.address, core.from_address), (self.address + ".>", core.from_address)]
        patterns += [(p, core.from_outbound) for p in self.config.outbound_subjects]
        for pattern, callback in patterns:
            sub = yield self.lattice.subscribe(pattern, callback)
            if self._closing is not None:
                sub.unsubscribe()
                return self
            self._subs.append(sub)
        self.log.info("{name}: starting (wire mode {wire}, lattice address {address})", name=self.name,
                      wire=self.config.wire_mode, address=self.address)
        self.connector.start()
        return self

    def stop(self, reason="the link was deleted"):
        """Close the connection and stop reconnecting. Deferred firing when it is closed."""
        if self._closing is None:
            for sub in self._subs:
                sub.unsubscribe()
            self._subs = []
            self._closing = self.connector.stop().addCallback(self._finished, reason)
        return mirror(self._closing)

    def _finished(self, _, reason):
        error = NotConnected(f"{self.name} is closed: {reason}")
        self.core.close(reason, error)
        self._wake_waiters(error)
        self.log.info("{name}: closed ({reason})", name=self.name, reason=reason)

    def when_connected(self):
        """Deferred firing with this link once it is connected (at once if it is); fails with
        ``NotConnected`` if the link is closed or gives up first."""
        if self.core.ready:
            return defer.succeed(self)
        if self.core.closed_error is not None:
            return defer.fail(self.core.closed_error)
        d = defer.Deferred()
        self._connected_waiters.append(d)
        return d

    def _wake_waiters(self, error=None):
        waiters, self._connected_waiters = self._connected_waiters, []
        for d in waiters:
            d.callback(self) if error is None else d.errback(error)

    def drop(self, code=1000, reason="closed by the service"):
        """Close the current connection; the link reconnects after its backoff."""
        self._drop_code = code
        return self.connector.drop(reason)

    _drop_code = 1000

    # -- IConnectorHooks -------------------------------------------------------------------

    def connected(self, proto):
        self.connected_at = time.time()
        proto.transport.registerProducer(proto, True)
        self.core.connected()
        self._wake_waiters()

    def disconnected(self, reason):
        self.connected_at = None
        self.core.disconnected(NotConnected(f"{self.name} was lost before the reply arrived ({reason})"))

    def gave_up(self, reason):
        error = NotConnected(f"{self.name} gave up after {self.connector.attempt} failed attempts "
                             f"(last error: {reason})")
        self.core.close(f"gave up after {self.connector.attempt} failed attempts", error)
        self._wake_waiters(error)

    def close(self, proto, reason):
        code, self._drop_code = self._drop_code, 1000
        proto.sendClose(code, reason[:100])

    def abort(self, proto):
        proto.transport.abortConnection()

    def describe(self, proto):
        core = self.core
        if core.remote_session_id:
            return f"envelope frames, session {core.remote_session_id}"
        return "envelope frames" if proto.websocket_protocol_in_use else "raw frames"

    # -- protocol events ---------------------------------------------------------------------

    def opened(self, proto):
        if proto is not self.connector.protocol:
            return
        chosen = proto.websocket_protocol_in_use
        if chosen == envelope.JSON_PROTOCOL:
            # connected once the server's welcome frame arrives
            self.core.attach(proto, envelope.CODECS[chosen], partial(self.connector.handshake_done, proto))
        elif self.config.wire_mode == "envelope":
            self.connector.drop(f"the server did not accept the {envelope.JSON_PROTOCOL} subprotocol, which "
                                "WIRE_MODE=envelope requires; use WIRE_MODE=auto or raw for an ordinary WebSocket "
                                "server")
        else:
            self.core.attach(proto, RAW_CODEC, None)
            self.connector.handshake_done(proto)

    def received(self, proto, payload, is_binary):
        if proto is self.connector.protocol and self.core.transport is proto:
            self.core.received(payload, is_binary)

    def resumed(self, proto):
        if self.core.transport is proto:
            self.core.flush()

    def closed(self, proto, text):
        self.connector.lost(proto, text)

    # -- messaging ---------------------------------------------------------------------------

    def send(self, msg):
        return self.core.send(msg)

    def request(self, subject, body, timeout_ms):
        return self.core.request(subject, body, timeout_ms)

    def pending_requests(self) -> int:
        return self.core.pending_requests()

    def describe_session(self) -> dict:
        core, connector = self.core, self.connector
        up = core.ready and core.transport is not None
        retry_in = None
        if connector.state == BACKING_OFF and connector.next_retry_at is not None:
            retry_in = round(max(connector.next_retry_at - self.reactor.seconds(), 0.0), 3)
        return {
            "session_id": self.link_id,
            "address": self.address,
            "mode": "client",
            "uri": self.target.shown,
            "state": connector.state if connector.state != "idle" else STOPPED,
            "attempts": connector.attempt,
            "connects": connector.connects,
            "last_error": connector.last_error,
            "retry_in": retry_in,
            "connected_at": self.connected_at,
            "peer": f"{self.target.host}:{self.target.port}",
            "wire_mode": ("envelope" if core.codec is not RAW_CODEC else "raw") if up else None,
            "subprotocol": core.transport.websocket_protocol_in_use if up else None,
            "remote_session_id": core.remote_session_id if up else None,
            "remote_reply_to": core.remote_reply_to if up else None,
            "subscriptions": list(self.config.remote_subscriptions),
            "links": sorted(self.owners),
            "buffered_messages": len(core.buffer),
            "buffered_bytes": core.buffer.bytes,
            "pending_requests": core.pending_requests(),
            "messages_in": core.messages_in,
            "messages_out": core.messages_out,
            "loops_cut": core.guard.cut,
        }


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
                starting.addErrback(self._start_failed_late, link.link_id).addBoth(self._started, link.link_id)
            elif failure_if_failed(starting) is not None:
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
        return result

    def _start_failed_late(self, failure, link_id):
        return self._start_failed(failure, self.links.get(link_id))

    def _start_failed(self, failure, link):
        self.log.error("client link {link}: cannot subscribe its subjects on the lattice: {error}",
                       link=link.link_id if link is not None else "?", error=failure.getErrorMessage())
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
        return [link.describe_session() for link in self.links.values()]

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

