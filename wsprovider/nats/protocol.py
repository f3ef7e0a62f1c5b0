"""The NATS wire protocol: an incremental parser and one connection's Twisted Protocol.

The protocol knows a single connection: the INFO/TLS/CONNECT handshake, PING/PONG, and
batching of outgoing writes. Subscriptions, reconnection and buffering live in
``client.py``; the protocol hands every server event to its ``client`` object.
"""

import json
from collections import deque

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from .errors import (
    AuthorizationError, ConnectionClosedError, ProtocolError, ServerError, StaleConnectionError,
)

CRLF = b"\r\n"
PING = b"PING\r\n"
PONG = b"PONG\r\n"
# Longest control line we accept before deciding the peer is not speaking NATS.
MAX_CONTROL_LINE = 64 * 1024

_M, _H, _P, _I, _PLUS, _MINUS = b"MHPI+-"


class NatsParser:
    """Incremental parser of server-to-client NATS protocol messages.

    ``feed`` accepts any chunking of the byte stream and calls the receiver's
    ``nats_msg(subject, sid, reply, payload, header_block)``, ``nats_info(dict)``,
    ``nats_ping()``, ``nats_pong()``, ``nats_ok()`` and ``nats_err(text)``.
    Incomplete input stays buffered until the rest arrives.
    """

    __slots__ = ("_buffer", "_receiver")

    def __init__(self, receiver):
        self._buffer = bytearray()
        self._receiver = receiver

    def feed(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        pos = 0
        receiver = self._receiver
        try:
            while True:
                end = buf.find(CRLF, pos)
                if end < 0:
                    if len(buf) - pos > MAX_CONTROL_LINE:
                        raise ProtocolError("control line too long; is this a NATS server?")
                    return
                first = buf[pos]
                if first == _M:  # MSG <subject> <sid> [reply] <#bytes>
                    args = buf[pos + 4:end].split()
                    start = end + 2
                    stop = start + int(args[-1])
                    if len(buf) < stop + 2:
                        return
                    if buf[stop:stop + 2] != CRLF:
                        raise ProtocolError("MSG payload is not followed by CRLF")
                    payload = bytes(buf[start:stop])
                    pos = stop + 2
                    receiver.nats_msg(
                        args[0].decode(), int(args[1]),
                        args[2].decode() if len(args) == 4 else None, payload, None)
                elif first == _H:  # HMSG <subject> <sid> [reply] <#header bytes> <#total bytes>
                    args = buf[pos + 5:end].split()
                    start = end + 2
                    header_end = start + int(args[-2])
                    stop = start + int(args[-1])
                    if len(buf) < stop + 2:
                        return
                    if buf[stop:stop + 2] != CRLF:
                        raise ProtocolError("HMSG payload is not followed by CRLF")
                    header_block = bytes(buf[start:header_end])
                    payload = bytes(buf[header_end:stop])
                    pos = stop + 2
                    receiver.nats_msg(
                        args[0].decode(), int(args[1]),
                        args[2].decode() if len(args) == 5 else None, payload, header_block)
                elif first == _P:
                    op = bytes(buf[pos:end]).upper()
                    pos = end + 2
                    if op == b"PING":
                        receiver.nats_ping()
                    elif op == b"PONG":
                        receiver.nats_pong()
                    else:
                        raise ProtocolError(f"unknown operation {op[:32]!r}")
                elif first == _PLUS:
                    pos = end + 2
                    receiver.nats_ok()
                elif first == _MINUS:
                    text = bytes(buf[pos + 4:end]).decode("utf-8", "replace").strip()
                    pos = end + 2
                    receiver.nats_err(text.strip("'"))
                elif first == _I:
                    info = json.loads(bytes(buf[pos + 4:end]))
                    pos = end + 2
                    receiver.nats_info(info)
                else:
                    raise ProtocolError(f"unknown operation {bytes(buf[pos:end])[:32]!r}")
        except (ValueError, IndexError) as error:
            raise ProtocolError(f"malformed NATS protocol line: {error}") from error
        finally:
            del buf[:pos]


class NatsProtocol(Protocol):
    """One connection to one NATS server.

    ``ready`` fires with this protocol once INFO has arrived, TLS (if any) is up, CONNECT
    was sent and the server answered our first PING, which proves it accepted CONNECT.
    """

    _log = Logger()

    def __init__(self, client, server, reactor):
        self.client = client
        self.server = server
        self.reactor = reactor
        self.info = {}
        self.ready = Deferred(self._cancel_handshake)
        self.is_ready = False
        self.pings_outstanding = 0
        self._parser = NatsParser(self)
        self._pong_waiters = deque()
        self._outgoing = []
        self._flush_call = None
        self._receiving = False
        self._lost = False
        self.on_lost = None

    # -- outgoing -------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one reactor turn goes out in one write.

        Sends made while handling received data are written when that data is done;
        others are written at the next reactor turn.
        """
        self._outgoing.append(data)
        if self._flush_call is None and not self._receiving:
            self._flush_call = self.reactor.callLater(0, self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self._flush_call = None
        self.flush_outgoing()

    def flush_outgoing(self) -> None:
        if self._outgoing and not self._lost:
            data = b"".join(self._outgoing)
            self._outgoing.clear()
            self.transport.write(data)

    def ping(self) -> Deferred:
        """Send PING; the Deferred fires when the matching PONG arrives."""
        waiter = Deferred()
        if self._lost:
            waiter.errback(ConnectionClosedError("connection to NATS server lost"))
            return waiter
        self._pong_waiters.append(waiter)
        self.send(PING)
        return waiter

    def keepalive_ping(self) -> None:
        """Send a PING whose PONG only proves liveness; drop the connection if too many are late."""
        if self._lost:
            return
        if self.pings_outstanding >= self.client.options.max_outstanding_pings:
            self._log.warn("NATS server {server} stopped answering PINGs; reconnecting",
                           server=self.server.netloc)
            self.client.report_error(StaleConnectionError(
                f"NATS server {self.server.netloc} did not answer {self.pings_outstanding} PINGs"))
            self._lost = True  # nothing more goes to this connection
            self.transport.abortConnection()
            return
        self.pings_outstanding += 1
        self._pong_waiters.append(None)
        self.send(PING)

    def close(self) -> None:
        self.flush_outgoing()
        self.transport.loseConnection()

    # -- Twisted Protocol -------------------------------------------------------------

    def connectionMade(self) -> None:
        # Writes are already batched per reactor turn; Nagle's algorithm on top would hold a
        # small message back until the previous one is ACKed (~40 ms with delayed ACKs), which
        # is every multi-message exchange (wRPC handshakes, request/reply).
        if ITCPTransport.providedBy(self.transport):  # not on memory transports in tests
            self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        self._receiving = True
        try:
            self._parser.feed(data)
        except ProtocolError as error:
            self._log.error("NATS protocol error from {server}: {error}",
                            server=self.server.netloc, error=error)
            self._fail_handshake(error)
            self.client.report_error(error)
            self.transport.abortConnection()
        finally:
            self._receiving = False
        if self._outgoing:
            self.flush_outgoing()

    def connectionLost(self, reason=None) -> None:
        self._lost = True
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        # Publishes queued but never handed to the transport did not reach the server:
        # the client sends them again after reconnecting instead of losing them silently.
        unsent = [data for data in self._outgoing if data.startswith((b"PUB ", b"HPUB "))]
        self._outgoing.clear()
        why = reason.getErrorMessage() if reason is not None else "unknown reason"
        lost = ConnectionClosedError(f"connection to NATS server {self.server.netloc} lost: {why}")
        self._fail_handshake(lost)
        waiters, self._pong_waiters = self._pong_waiters, deque()
        for waiter in waiters:
            if waiter is not None:
                waiter.errback(lost)
        if self.is_ready:
            self.client.connection_lost(self, reason, unsent)
        if self.on_lost is not None:
            self.on_lost()

    # -- parser receiver ----------------------------------------------------------------

    def nats_msg(self, subject, sid, reply, payload, header_block):
        self.client.deliver(subject, sid, reply, payload, header_block)

    def nats_info(self, info):
        first = not self.info
        self.info = info
        if first:
            self._start_handshake()
        else:
            self.client.server_info_updated(self, info)

    def nats_ping(self):
        self.send(PONG)

    def nats_pong(self):
        self.pings_outstanding = 0
        if self._pong_waiters:
            waiter = self._pong_waiters.popleft()
            if waiter is not None:
                waiter.callback(None)

    def nats_ok(self):
        pass

    def nats_err(self, text):
        lowered = text.lower()
        if "authorization" in lowered or "authentication" in lowered or "permissions" in lowered:
            error = AuthorizationError(text)
        else:
            error = ServerError(text)
        self._log.warn("NATS server {server} sent -ERR {text!r}",
                       server=self.server.netloc, text=text)
        self.client.report_error(error)
        if not self.is_ready:
            self._fail_handshake(error)
            self.transport.loseConnection()

    # -- handshake ------------------------------------------------------------------

    def _start_handshake(self):
        try:
            wants_tls = self.server.tls or self.info.get("tls_required", False)
            if wants_tls:
                if not (self.info.get("tls_required") or self.info.get("tls_available")):
                    raise ProtocolError(
                        f"{self.server.url} asks for TLS but the server does not offer it")
                self.transport.startTLS(self.client.tls_options_for(self.server))
            connect = self.client.connect_fields(self.server, self.info)
        except Exception as error:
            self._fail_handshake(error)
            self.transport.abortConnection()
            return
        self.send(b"CONNECT " + json.dumps(connect, separators=(",", ":")).encode() + CRLF)
        self.ping().addCallbacks(self._handshake_done, lambda failure: None)

    def _handshake_done(self, _):
        if self.ready.called:
            return
        self.is_ready = True
        self.ready.callback(self)

    def _fail_handshake(self, error):
        if not self.ready.called:
            self.ready.errback(error)

    def _cancel_handshake(self, _deferred):
        if self.transport is not None:
            self.transport.abortConnection()
