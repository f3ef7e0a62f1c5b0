"""The HTTP phase of a connection: a deadline for the whole upgrade, and caps on waiting.

``twisted.web`` resets its idle timer on every byte, and Autobahn's opening-handshake
timeout starts only once the HTTP request is complete, so a peer dripping one byte a
second could hold a connection (and a file descriptor) forever. ``HandshakeGuard``
bounds that phase:

* every connection must finish its HTTP request and WebSocket upgrade within
  ``HANDSHAKE_TIMEOUT_SEC`` (a kept-alive plain HTTP connection: each further request
  within that time of the previous answer); past it the peer gets ``408`` and the
  connection is closed (aborted one second later if it still lingers);
* at most ``MAX_PENDING_HANDSHAKES`` connections wait for their upgrade at once; once half
  of those are in use, an address already holding ``MAX_HANDSHAKES_PER_ADDRESS`` gets no
  more (a burst from one busy address, e.g. a NAT, passes while the server is not under
  pressure; under pressure one address cannot take the slots of the others); and with
  ``MAX_CONNECTIONS`` set, waiting connections and sessions together stay under it;
  a connection over a cap is answered ``503`` and closed at once.

Counted in ``SessionStats`` (``handshakes_pending``, ``handshake_timeouts``,
``refusals[pending_handshakes|address_handshakes|max_connections]``) and so in
``/metrics``. ``guard_site(site, factory)`` installs it on a ``twisted.web`` site whose
WebSocket resource serves ``factory``.
"""

from __future__ import annotations

import collections

from twisted.logger import Logger
from twisted.web.http import HTTPChannel

_log = Logger(namespace="wsprovider.handshake")

_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: 52\r\n\r\nthe HTTP request took too long (HANDSHAKE_TIMEOUT_SEC)")
_BUSY_RESPONSE = (b"HTTP/1.1 503 %s\r\nConnection: close\r\nRetry-After: 5\r\n"
                  b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s")


def _host(transport) -> str:
    try:
        peer = transport.getPeer()
    except Exception:
        return "?"
    return str(getattr(peer, "host", peer))


class HandshakeGuard:
    """Connections not upgraded yet: their deadline, and the caps on how many wait.

    :param clock: an ``IReactorTime``.
    :param config: a ``ProviderConfig`` (the ``HANDSHAKE_*`` settings, ``MAX_CONNECTIONS``).
    :param stats: the hub's ``SessionStats``.
    :param sessions: ``f() -> int``, sessions admitted and not closed yet.
    """

    def __init__(self, clock, config, stats, sessions=lambda: 0):
        self._clock = clock
        self.timeout = config.handshake_timeout_sec
        self.max_pending = config.max_pending_handshakes
        self.max_per_address = config.max_handshakes_per_address
        self.max_connections = config.max_connections
        self._stats = stats
        self._sessions = sessions
        self._pending: dict = {}                  # transport -> [host, timer]
        self._by_host = collections.Counter()

    def __len__(self) -> int:
        return len(self._pending)

    def refusal(self, host: str) -> tuple | None:
        """``(kind, message)`` when a new connection from ``host`` must be refused, else None."""
        if len(self._pending) >= self.max_pending:
            return ("pending_handshakes", f"{len(self._pending)} connections are already waiting for their "
                    "upgrade (MAX_PENDING_HANDSHAKES); retry later")
        if self._by_host[host] >= self.max_per_address and len(self._pending) * 2 >= self.max_pending:
            return ("address_handshakes", f"{self._by_host[host]} connections from your address are already "
                    "waiting for their upgrade (MAX_HANDSHAKES_PER_ADDRESS); finish those first")
        if self.max_connections and self._sessions() + len(self._pending) >= self.max_connections:
            return ("max_connections", f"too many connections: this server accepts {self.max_connections} "
                    "(MAX_CONNECTIONS); retry later")
        return None

    def opened(self, transport, expire) -> bool:
        """A new connection; ``expire()`` runs at its deadline. False: refused (counted)."""
        host = _host(transport)
        refused = self.refusal(host)
        if refused is not None:
            kind, message = refused
            self._stats.refusals[kind] += 1
            body = message.encode()
            transport.write(_BUSY_RESPONSE % (body, len(body), body))
            transport.loseConnection()
            return False
        self._by_host[host] += 1
        self._pending[transport] = [host, self._clock.callLater(self.timeout, self._expired, transport, expire)]
        self._stats.handshakes_pending = len(self._pending)
        return True

    def restart(self, transport, expire) -> None:
        """A plain HTTP request was answered: the next one has a full deadline again."""
        entry = self._pending.get(transport)
        if entry is not None:
            if entry[1].active():
                entry[1].cancel()
            entry[1] = self._clock.callLater(self.timeout, self._expired, transport, expire)

    def done(self, transport) -> None:
        """The connection was upgraded, or is gone."""
        entry = self._pending.pop(transport, None)
        if entry is None:
            return
        host, timer = entry
        if timer.active():
            timer.cancel()
        self._by_host[host] -= 1
        if self._by_host[host] <= 0:
            del self._by_host[host]
        self._stats.handshakes_pending = len(self._pending)

    upgraded = done

    def _expired(self, transport, expire):
        entry = self._pending.get(transport)
        if entry is None:
            return
        entry[1] = _Spent
        self._stats.handshake_timeouts += 1
        self.done(transport)
        expire()


class _Spent:
    @staticmethod
    def active():
        return False


class GuardedHTTPChannel(HTTPChannel):
    """``HTTPChannel`` under a ``HandshakeGuard`` (``site.handshake_guard``)."""

    _guarded = False
    _abort_call = None

    def connectionMade(self):
        HTTPChannel.connectionMade(self)
        guard = getattr(self.site, "handshake_guard", None)
        if guard is not None:
            self._guard = guard
            self._guard_transport = self.transport
            self._guarded = guard.opened(self.transport, self._handshake_expired)

    def _handshake_expired(self):
        transport = self.transport
        if transport is None:  # taken over by the WebSocket protocol meanwhile
            return
        _log.info("closing a connection from {peer}: no complete HTTP request/upgrade within {t}s",
                  peer=_host(transport), t=self._guard.timeout)
        transport.write(_TIMEOUT_RESPONSE)
        transport.loseConnection()
        self._abort_call = self.callLater(1.0, self._abort_if_connected, transport)

    @staticmethod
    def _abort_if_connected(transport):
        if getattr(transport, "connected", False) and hasattr(transport, "abortConnection"):
            transport.abortConnection()

    def requestDone(self, request):
        HTTPChannel.requestDone(self, request)
        if self._guarded and self.transport is not None:
            self._guard.restart(self.transport, self._handshake_expired)

    def connectionLost(self, reason):
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        if self._guarded:
            self._guarded = False
            self._guard.done(self._guard_transport)
        HTTPChannel.connectionLost(self, reason)


def guard_site(site, factory):
    """Put ``site``'s connections under a ``HandshakeGuard`` for the WebSocket ``factory``
    (a ``MessagingServerFactory``), which releases a connection from it once upgraded."""
    hub = factory.hub
    guard = HandshakeGuard(factory.reactor, factory.config, hub.stats, lambda: hub.connection_count)
    site.protocol = GuardedHTTPChannel
    site.handshake_guard = guard
    factory.handshake_guard = guard
    return site
