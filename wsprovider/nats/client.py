"""NatsClient: subscriptions, requests, buffering and reconnection over NatsProtocol.

Why not ``ClientService``: its ``prepareConnection`` hook (where the NATS handshake
belongs) leaves a rejected connection open, and closing it ourselves makes its state
machine raise ``NoTransition`` (Twisted 26.10). The loop below is small instead:
``_attempt`` -> handshake -> ``_connected``; a failure or a lost connection schedules the
next attempt after a full-jitter exponential backoff.
"""

import enum
import random
import secrets

import attrs
from twisted.application.service import Service
from twisted.internet import ssl
from twisted.internet.defer import Deferred, fail, succeed, DeferredList
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .._defer import failure_if_failed
from .._version import __version__
from ..replies import PendingReplies
from .auth import Credentials
from .errors import (
    BufferFullError, ConnectionClosedError, MaxPayloadError, NatsError, NatsTimeoutError,
    NoRespondersError, ProtocolError, SlowConsumerError,
)
from .message import NO_RESPONDERS_STATUS, Msg, decode_headers, encode_headers
from .protocol import NatsProtocol
from .servers import ServerPool

DEFAULT_MAX_PAYLOAD = 1024 * 1024
_SUBJECT_CACHE_LIMIT = 4096
_FORBIDDEN_IN_SUBJECT = frozenset(" \t\r\n")


def _request_timed_out(entry, timeout):
    return NatsTimeoutError(f"no reply to request on {entry.label!r} within {timeout}s; is the responder "
                            "running and fast enough?")


class State(str, enum.Enum):
    CONNECTING = "connecting"      # before the first successful connection
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # lost the connection; trying again
    DRAINING = "draining"
    CLOSED = "closed"


@attrs.frozen(kw_only=True)
class ClientOptions:
    """Everything configurable about a NatsClient (pass these as keyword arguments)."""

    name: str | None = None
    # Authentication (URL user:password@ / token@ also work).
    token: str | None = None
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    nkey_seed: bytes | str | None = attrs.field(default=None, repr=False)
    creds_file: str | None = None
    user_jwt: str | None = attrs.field(default=None, repr=False)
    # TLS: verification is always on; without a CA file the platform trust store is used.
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_hostname: str | None = None
    echo: bool = True
    # Reconnection: attempts are per outage (and for the first connect); -1 means forever.
    allow_reconnect: bool = True
    max_reconnect_attempts: int = -1
    reconnect_base_delay: float = 0.05
    reconnect_max_delay: float = 2.0
    connect_timeout: float = 5.0
    ping_interval: float = 120.0
    max_outstanding_pings: int = 2
    pending_buffer_bytes: int = 8 * 1024 * 1024
    # Per-subscription limit of messages whose callback Deferred has not fired yet.
    pending_msgs_limit: int = 65536
    pending_bytes_limit: int = 64 * 1024 * 1024
    randomize_servers: bool = True
    inbox_prefix: str = "_INBOX"
    drain_timeout: float = 30.0


def full_jitter_delay(failures: int, base: float, cap: float, rng=random) -> float:
    """Exponential backoff with full jitter: uniform over [0, min(cap, base * 2**failures)]."""
    return rng.uniform(0, min(cap, base * (2 ** min(failures, 32))))


def _check_subject(subject: str, what: str = "subject") -> None:
    if not subject or not _FORBIDDEN_IN_SUBJECT.isdisjoint(subject):
        raise ValueError(f"invalid NATS {what} {subject!r}: must be non-empty without whitespace")


class Subscription:
    """A live subscription; ``received``, ``dropped`` and ``pending_*`` are counters."""

    _log = Logger()

    def __init__(self, client, sid, subject, queue, callback, max_msgs,
                 pending_msgs_limit, pending_bytes_limit):
        self._client = client
        self.sid = sid
        self.subject = subject
        self.queue = queue
        self.callback = callback
        self.max_msgs = max_msgs
        self.pending_msgs_limit = pending_msgs_limit
        self.pending_bytes_limit = pending_bytes_limit
        self.received = 0
        self.dropped = 0
        self.pending_msgs = 0
        self.pending_bytes = 0
        self.closed = False
        self._slow = False
        self._idle_waiters = []

    def unsubscribe(self, max_msgs: int | None = None) -> Deferred:
        """Stop now, or after ``max_msgs`` messages in total have been received."""
        return self._client._unsubscribe(self, max_msgs)

    def when_idle(self) -> Deferred:
        """Fires when no callback Deferred of this subscription is still in flight."""
        if not self.pending_msgs:
            return succeed(None)
        waiter = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def sub_line(self) -> bytes:
        if self.queue:
            return f"SUB {self.subject} {self.queue} {self.sid}\r\n".encode()
        return f"SUB {self.subject} {self.sid}\r\n".encode()

    def dispatch(self, msg: Msg) -> None:
        size = len(msg.data)
        if self.pending_msgs and (self.pending_msgs >= self.pending_msgs_limit
                                  or self.pending_bytes + size > self.pending_bytes_limit):
            self.dropped += 1
            if not self._slow:
                self._slow = True
                self._log.warn("NATS slow consumer on {subject!r}: dropping messages while "
                               "{pending} are in flight", subject=self.subject,
                               pending=self.pending_msgs)
                self._client.report_error(SlowConsumerError(self.subject, self.sid, self.dropped))
            return
        try:
            result = self.callback(msg)
        except Exception:
            self._log.failure("NATS subscription callback for {subject!r} raised",
                              subject=self.subject)
            return
        if isinstance(result, Deferred):
            if result.called:
                result.addErrback(self._callback_failed)
            else:
                self.pending_msgs += 1
                self.pending_bytes += size
                result.addBoth(self._settled, size)

    def _callback_failed(self, failure):
        self._log.failure("NATS subscription callback for {subject!r} failed", failure,
                          subject=self.subject)

    def _settled(self, result, size):
        self.pending_msgs -= 1
        self.pending_bytes -= size
        if isinstance(result, Failure):
            self._callback_failed(result)
        if not self.pending_msgs:
            self._slow = False
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)


class NatsClient(Service):
    """A NATS client on Twisted: publish, subscribe, request, with reconnection.

    Construct with the server URL(s) and :class:`ClientOptions` keywords, then ``start()``
    (or use ``connect()``, or add it to a service hierarchy: it is an ``IService``).
    Publishing and subscribing work before the first connection: they are buffered.
    """

    _log = Logger()

    def __init__(self, servers="nats://127.0.0.1:4222", *, reactor=None, **options):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.options = ClientOptions(**options)
        self.credentials = Credentials.from_options(
            token=self.options.token, user=self.options.user, password=self.options.password,
            nkey_seed=self.options.nkey_seed, creds_file=self.options.creds_file,
            user_jwt=self.options.user_jwt)
        self.pool = ServerPool(servers, randomize=self.options.randomize_servers)
        self.state = State.CONNECTING
        self.server_info = {}
        self.connected_server = None
        self._protocol = None
        self._started = False
        self._attempt_deferred = None
        self._retry_call = None
        self._ping_call = None
        self._failures = 0
        self._quick_drops = 0       # connections in a row lost soon after they were made
        self._connected_at = None
        self._max_payload = DEFAULT_MAX_PAYLOAD
        self._pending = []
        self._pending_bytes = 0
        self._subs = {}
        self._next_sid = 1
        self._subject_cache = {}
        self._inbox_sub = None
        self._inbox_prefix = None
        self._requests = PendingReplies(self.reactor, timeout_error=_request_timed_out)
        self._next_request = 0
        self._state_listeners = []
        self._error_listeners = []
        self._connected_waiters = []
        self._flush_waiters = []
        self._closed_deferred = None
        self._draining = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> Deferred:
        """Begin connecting (idempotent); returns ``when_connected()``."""
        if not self._started and self.state is not State.CLOSED:
            self._started = True
            self._attempt()
        return self.when_connected()

    def startService(self):
        Service.startService(self)
        # Nobody waits for this first connection: closing (or giving up, which is logged)
        # before it must not leave an unhandled failure behind.
        self.start().addErrback(lambda _failure: None)

    def stopService(self):
        Service.stopService(self)
        return self.drain()

    def when_connected(self) -> Deferred:
        """Fires with this client when connected (now, or after the next (re)connect)."""
        if self.state is State.CONNECTED:
            return succeed(self)
        if self.state is State.CLOSED:
            return fail(ConnectionClosedError("the NATS client is closed"))
        waiter = Deferred()
        self._connected_waiters.append(waiter)
        return waiter

    @property
    def is_connected(self) -> bool:
        return self.state is State.CONNECTED

    @property
    def max_payload(self) -> int:
        return self._max_payload

    def on_state_change(self, listener):
        """Call ``listener(old_state, new_state)`` on every change; returns a remover."""
        self._state_listeners.append(listener)
        return lambda: self._state_listeners.remove(listener)

    def on_error(self, listener):
        """Call ``listener(error)`` for asynchronous errors (-ERR, slow consumer, ...)."""
        self._error_listeners.append(listener)
        return lambda: self._error_listeners.remove(listener)

    def _set_state(self, state: State) -> None:
        old, self.state = self.state, state
        if old is state:
            return
        self._log.info("NATS client {name} {old} -> {new}", name=self.options.name,
                       old=old.value, new=state.value, nats_state=state.value)
        for listener in list(self._state_listeners):
            try:
                listener(old, state)
            except Exception:
                self._log.failure("NATS state listener raised")

    def report_error(self, error: Exception) -> None:
        for listener in list(self._error_listeners):
            try:
                listener(error)
            except Exception:
                self._log.failure("NATS error listener raised")

    # -- connecting -----------------------------------------------------------------

    def _attempt(self) -> None:
        self._retry_call = None
        if self._closed_deferred is not None:
            return
        server = self.pool.next_server()
        endpoint = HostnameEndpoint(self.reactor, server.host, server.port,
                                    timeout=self.options.connect_timeout)
        factory = Factory.forProtocol(lambda: NatsProtocol(self, server, self.reactor))
        attempt = endpoint.connect(factory)
        attempt.addCallback(lambda protocol: protocol.ready)
        attempt.addTimeout(self.options.connect_timeout, self.reactor)
        self._attempt_deferred = attempt
        attempt.addCallbacks(self._connected, self._attempt_failed, errbackArgs=(server,))

    def _attempt_failed(self, failure, server):
        self._attempt_deferred = None
        if self.state in (State.CLOSED,) or self._closed_deferred is not None:
            return
        self._failures += 1
        self._log.info("NATS connect to {server} failed ({error}); attempt {n}",
                       server=server.netloc, error=failure.getErrorMessage(), n=self._failures)
        limit = self.options.max_reconnect_attempts
        if not self.options.allow_reconnect and self.state is not State.CONNECTING:
            limit = 0
        if 0 <= limit < self._failures:
            self._give_up(failure)
            return
        delay = full_jitter_delay(self._failures - 1, self.options.reconnect_base_delay,
                                  self.options.reconnect_max_delay)
        self._retry_call = self.reactor.callLater(delay, self._attempt)

    def _give_up(self, failure):
        self._log.warn("NATS client {name} gives up after {n} failed connection attempts",
                       name=self.options.name, n=self._failures)
        error = ConnectionClosedError(
            f"could not connect to any NATS server after {self._failures} attempts "
            f"(last error: {failure.getErrorMessage()})")
        self._shut_down(error, failure)

    def _connected(self, protocol: NatsProtocol):
        self._attempt_deferred = None
        if self._closed_deferred is not None or self.state is State.CLOSED:
            protocol.close()
            return
        self._failures = 0
        self._connected_at = self.reactor.seconds()
        self._protocol = protocol
        self.connected_server = protocol.server
        self._absorb_info(protocol, protocol.info)
        # Resubscribe first so buffered requests find their inbox subscription in place.
        resubscribe = []
        for sub in self._subs.values():
            resubscribe.append(sub.sub_line())
            if sub.max_msgs is not None:
                resubscribe.append(f"UNSUB {sub.sid} {sub.max_msgs - sub.received}\r\n".encode())
        if resubscribe:
            protocol.send(b"".join(resubscribe))
        if self._pending:
            protocol.send(b"".join(self._pending))
            self._pending.clear()
            self._pending_bytes = 0
        self._schedule_ping()
        self._set_state(State.CONNECTED)
        waiters, self._connected_waiters = self._connected_waiters, []
        for waiter in waiters:
            waiter.callback(self)

    def server_info_updated(self, protocol, info):
        if protocol is self._protocol:
            self._absorb_info(protocol, info)

    def _absorb_info(self, protocol, info):
        self.server_info = info
        self._max_payload = info.get("max_payload", DEFAULT_MAX_PAYLOAD)
        added = self.pool.learn(info.get("connect_urls"), tls=protocol.server.tls,
                                via=protocol.server)
        for server in added:
            self._log.info("NATS learned server {url}", url=server.url)

    def connection_lost(self, protocol, reason, unsent=()):
        if protocol is not self._protocol:
            return
        self._protocol = None
        self.connected_server = None
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None
        if self._closed_deferred is not None or self.state is State.CLOSED:
            return
        if not self.options.allow_reconnect:
            self._shut_down(ConnectionClosedError("connection to NATS lost; reconnect disabled"))
            return
        if unsent:  # accepted before anything buffered now, so they go out first
            self._pending[:0] = unsent
            self._pending_bytes += sum(len(data) for data in unsent)
        self._log.warn("NATS connection to {server} lost: {reason}", server=protocol.server.netloc,
                       reason=reason.getErrorMessage() if reason else "")
        # A connection that dies soon after its handshake (a server or proxy that accepts
        # CONNECT, then hangs up) counts towards the backoff, or we would hammer it forever.
        lived = self.reactor.seconds() - (self._connected_at or 0.0)
        self._quick_drops = self._quick_drops + 1 if lived < self.options.reconnect_max_delay else 0
        # Schedule before announcing: a state listener may close the client right away.
        self._retry_call = self.reactor.callLater(
            full_jitter_delay(max(self._quick_drops - 1, 0), self.options.reconnect_base_delay,
                              self.options.reconnect_max_delay), self._attempt)
        self._set_state(State.RECONNECTING)

    def _schedule_ping(self):
        self._ping_call = self.reactor.callLater(self.options.ping_interval, self._keepalive)

    def _keepalive(self):
        self._ping_call = None
        if self._protocol is not None:
            self._protocol.keepalive_ping()
            self._schedule_ping()

    def tls_options_for(self, server):
        trust_root = None
        if self.options.tls_ca_file:
            with open(self.options.tls_ca_file, "rb") as ca_file:
                pems = ca_file.read()
            certificates = [ssl.Certificate.loadPEM(block + b"-----END CERTIFICATE-----\n")
                            for block in pems.split(b"-----END CERTIFICATE-----")
                            if b"-----BEGIN CERTIFICATE-----" in block]
            trust_root = ssl.trustRootFromCertificates(certificates)
        client_certificate = None
        if self.options.tls_cert_file:
            with open(self.options.tls_cert_file, "rb") as cert_file:
                cert_pem = cert_file.read()
            with open(self.options.tls_key_file or self.options.tls_cert_file, "rb") as key_file:
                key_pem = key_file.read()
            client_certificate = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        return ssl.optionsForClientTLS(self.options.tls_hostname or server.tls_name or server.host,
                                       trustRoot=trust_root,
                                       clientCertificate=client_certificate)

    def connect_fields(self, server, info) -> dict:
        fields = {
            "verbose": False, "pedantic": False, "lang": "python-twisted",
            "version": __version__, "protocol": 1, "headers": True, "no_responders": True,
            "echo": self.options.echo,
            "tls_required": bool(server.tls or info.get("tls_required")),
        }
        if self.options.name:
            fields["name"] = self.options.name
        fields.update(self.credentials.connect_fields(info.get("nonce"), server))
        return fields

    # -- publishing -------------------------------------------------------------------

    def _encode_subject(self, subject: str) -> bytes:
        encoded = self._subject_cache.get(subject)
        if encoded is None:
            _check_subject(subject)
            encoded = subject.encode()
            if len(self._subject_cache) >= _SUBJECT_CACHE_LIMIT:
                self._subject_cache.clear()
            self._subject_cache[subject] = encoded
        return encoded

    def publish(self, subject: str, payload: bytes = b"", reply: str | None = None,
                headers=None) -> Deferred:
        """Send a message; fires once handed to the connection (or buffered while away).

        Fails with MaxPayloadError, BufferFullError or ConnectionClosedError; nothing is
        sent then. Use ``flush()`` to know the server has received it.
        """
        try:
            subject_bytes = self._subject_cache.get(subject) or self._encode_subject(subject)
            size = len(payload)
            if headers is None:
                if size > self._max_payload:
                    raise MaxPayloadError(size, self._max_payload)
                if reply is None:
                    line = b"PUB %s %d\r\n%s\r\n" % (subject_bytes, size, payload)
                else:
                    line = b"PUB %s %s %d\r\n%s\r\n" % (
                        subject_bytes, self._encode_subject(reply), size, payload)
            else:
                header_block = encode_headers(headers)
                total = len(header_block) + size
                if total > self._max_payload:
                    raise MaxPayloadError(total, self._max_payload)
                if reply is None:
                    line = b"HPUB %s %d %d\r\n%s%s\r\n" % (
                        subject_bytes, len(header_block), total, header_block, payload)
                else:
                    line = b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
                        subject_bytes, self._encode_subject(reply), len(header_block), total,
                        header_block, payload)
            self._send(line)
        except (NatsError, ValueError, TypeError) as error:
            return fail(error)
        return succeed(None)

    def _send(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.send(data)
            return
        if self.state is State.CLOSED or self._closed_deferred is not None:
            raise ConnectionClosedError("the NATS client is closed; nothing can be sent")
        if self._pending_bytes + len(data) > self.options.pending_buffer_bytes:
            raise BufferFullError(self._pending_bytes, self.options.pending_buffer_bytes)
        self._pending.append(data)
        self._pending_bytes += len(data)

    # -- subscribing ------------------------------------------------------------------

    def subscribe(self, subject: str, callback, queue: str | None = None, *,
                  max_msgs: int | None = None, pending_msgs_limit: int | None = None,
                  pending_bytes_limit: int | None = None) -> Deferred:
        """Subscribe ``callback(msg)``; fires with the Subscription once the server has it.

        While disconnected it fires at once; the subscription is sent on (re)connect.
        A callback returning an unfired Deferred keeps that message "pending" until it fires.
        """
        try:
            _check_subject(subject)
            if queue is not None:
                _check_subject(queue, "queue group")
            sub = self._add_subscription(subject, callback, queue, max_msgs, pending_msgs_limit,
                                         pending_bytes_limit)
        except (NatsError, ValueError) as error:
            return fail(error)
        if self._protocol is None:
            return succeed(sub)
        return self.flush().addBoth(lambda _: sub)

    def _add_subscription(self, subject, callback, queue, max_msgs=None,
                          pending_msgs_limit=None, pending_bytes_limit=None):
        if self.state is State.CLOSED or self._closed_deferred is not None:
            raise ConnectionClosedError("the NATS client is closed; cannot subscribe")
        sid = self._next_sid
        self._next_sid += 1
        sub = Subscription(
            self, sid, subject, queue, callback, max_msgs,
            pending_msgs_limit or self.options.pending_msgs_limit,
            pending_bytes_limit or self.options.pending_bytes_limit)
        self._subs[sid] = sub
        line = sub.sub_line()
        if max_msgs is not None:
            line += f"UNSUB {sid} {max_msgs}\r\n".encode()
        if self._protocol is not None:
            self._protocol.send(line)
        return sub

    def _unsubscribe(self, sub: Subscription, max_msgs: int | None) -> Deferred:
        if sub.closed:
            return succeed(None)
        if max_msgs is not None and sub.received < max_msgs:
            sub.max_msgs = max_msgs
            line = f"UNSUB {sub.sid} {max_msgs}\r\n".encode()
        else:
            sub.closed = True
            self._subs.pop(sub.sid, None)
            line = f"UNSUB {sub.sid}\r\n".encode()
        if self._protocol is not None:
            self._protocol.send(line)
        return succeed(None)

    def deliver(self, subject, sid, reply, payload, header_block):
        """Called by the protocol for every MSG/HMSG."""
        sub = self._subs.get(sid)
        if sub is None:
            return
        if header_block is None:
            msg = Msg(subject, sid, reply, payload, None, None, None, None, self)
        else:
            try:
                headers, items, status, description = decode_headers(header_block)
            except ValueError as error:
                self.report_error(ProtocolError(f"bad header block on {subject!r}: {error}"))
                return
            msg = Msg(subject, sid, reply, payload, headers, items, status, description, self)
        sub.received += 1
        if sub.max_msgs is not None and sub.received >= sub.max_msgs:
            sub.closed = True
            del self._subs[sid]
        sub.dispatch(msg)

    # -- requests -------------------------------------------------------------------

    def request(self, subject: str, payload: bytes = b"", timeout: float = 5.0,
                headers=None) -> Deferred:
        """Publish with a reply inbox; fires with the first reply Msg.

        Fails with NoRespondersError (nobody subscribed), NatsTimeoutError, or the publish's
        errors. All requests share one ``_INBOX.<unique>.*`` subscription.
        """
        if self._inbox_sub is None:
            try:
                self._inbox_prefix = f"{self.options.inbox_prefix}.{secrets.token_hex(11)}."
                self._inbox_sub = self._add_subscription(
                    self._inbox_prefix + "*", self._handle_response, None)
            except NatsError as error:
                return fail(error)
        self._next_request += 1
        token = str(self._next_request)
        published = self.publish(subject, payload, self._inbox_prefix + token, headers)
        if failure_if_failed(published) is not None:
            return published
        return self._requests.add(token, timeout, label=subject)

    def _handle_response(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox_prefix):]
        if msg.status == NO_RESPONDERS_STATUS and not msg.data:
            entry = self._requests.get(token)
            if entry is not None:
                self._requests.fail(token, NoRespondersError(entry.label))
        else:
            self._requests.resolve(token, msg)

    # -- flush, drain, close ----------------------------------------------------------

    def flush(self, timeout: float | None = None) -> Deferred:
        """Fires when the server has processed everything sent so far (PING/PONG)."""
        if self.state is State.CLOSED:
            return fail(ConnectionClosedError("the NATS client is closed"))
        if self._protocol is not None:
            flushed = self._protocol.ping()
        else:
            flushed = self.when_connected().addCallback(lambda _: self._protocol.ping())
        if timeout is not None:
            flushed.addTimeout(timeout, self.reactor, onTimeoutCancel=self._flush_timed_out)
        return flushed

    @staticmethod
    def _flush_timed_out(result, timeout):
        if isinstance(result, Failure):
            return Failure(NatsTimeoutError(f"NATS flush not acknowledged within {timeout}s"))
        return result

    def drain(self) -> Deferred:
        """Unsubscribe everything, finish in-flight callbacks, flush publishes, then close."""
        if self.state is State.CLOSED:
            return succeed(None)
        if self._closed_deferred is not None:
            return self._closed_deferred_copy()
        if self._draining is not None:
            return self._draining
        if self._protocol is None:
            return self.close()
        self._set_state(State.DRAINING)
        user_subs = [sub for sub in self._subs.values() if sub is not self._inbox_sub]
        if user_subs:
            self._protocol.send(b"".join(f"UNSUB {sub.sid}\r\n".encode() for sub in user_subs))
        drained = self._protocol.ping()

        def wait_for_callbacks(_):
            for sub in user_subs:
                sub.closed = True
                self._subs.pop(sub.sid, None)
            return DeferredList([sub.when_idle() for sub in user_subs], consumeErrors=True)

        drained.addCallback(wait_for_callbacks)
        drained.addCallback(lambda _: self.flush())
        drained.addTimeout(self.options.drain_timeout, self.reactor)
        drained.addErrback(lambda failure: self._log.warn(
            "NATS drain did not complete cleanly: {error}", error=failure.getErrorMessage()))
        drained.addCallback(lambda _: self.close())
        self._draining = Deferred()
        drained.addBoth(lambda result: (self._draining.callback(None), result)[1])
        return drained

    def close(self) -> Deferred:
        """Close now: pending requests fail, buffered publishes are dropped."""
        if self.state is State.CLOSED:
            return succeed(None)
        if self._closed_deferred is not None:
            return self._closed_deferred_copy()
        return self._shut_down(ConnectionClosedError("the NATS client was closed"))

    def _closed_deferred_copy(self):
        copy = Deferred()
        self._closed_deferred.addBoth(lambda result: (copy.callback(None), result)[1])
        return copy

    def _shut_down(self, error, cause=None) -> Deferred:
        self._closed_deferred = Deferred()
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None
        if self._attempt_deferred is not None:
            self._attempt_deferred.cancel()
        if self._pending:
            self._log.warn("NATS client closed with {n} buffered bytes unsent",
                           n=self._pending_bytes)
        self._pending.clear()
        self._pending_bytes = 0
        protocol, self._protocol = self._protocol, None
        self._requests.close(ConnectionClosedError("the NATS client closed before the reply arrived"))
        for sub in self._subs.values():
            sub.closed = True
        self._subs.clear()
        waiters, self._connected_waiters = self._connected_waiters, []
        done = self._closed_deferred
        self._set_state(State.CLOSED)
        for waiter in waiters:
            waiter.errback(cause if cause is not None else error)
        if protocol is not None and protocol.transport is not None:
            lost = protocol.transport.connected
            protocol.close()
            if lost:
                # Fire once the socket is really gone so tests and shutdown leave nothing open.
                protocol.on_lost = lambda: done.callback(None)
                return self._closed_deferred_copy()
        done.callback(None)
        return succeed(None)


def connect(servers="nats://127.0.0.1:4222", *, reactor=None, **options) -> Deferred:
    """Create and start a NatsClient; fires with it once the first connection is up."""
    client = NatsClient(servers, reactor=reactor, **options)
    return client.start()
