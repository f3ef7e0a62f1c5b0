"""The link connector: one outbound connection kept up, as an explicit state machine.

Modelled on Twisted's ``ClientService`` (``twisted/application/_client_service.py``):
an ``automat`` machine whose states, inputs and outputs are the one table in
``_build_machine``. It differs where a WebSocket link needs it:

* a connection is *up* only when the link says so (``handshake_done``: the WebSocket
  upgrade and, in envelope mode, the server's ``welcome``), and the whole attempt —
  TCP/TLS connect, upgrade, welcome — is bounded by one timer (``connect_timeout``);
* one attempt counter. ``attempt`` is the number of the attempt in progress, or of the
  last one that failed; it is the count of failed attempts in a row, and it drives the
  backoff. A connection that ends before ``stable_after`` seconds counts as a failed
  attempt (a server that accepts and hangs up at once is not hammered); one that stayed
  up that long resets the count. Every transition logs one line, with that number;
* ``max_attempts`` failed attempts in a row end in ``GaveUp``.

Why not ``ClientService(prepareConnection=...)``: with Twisted 26.10 its machine has no
transition for ``_clientDisconnected`` in state ``Connecting``, so a connection lost
while ``prepareConnection`` is pending (what a refused WebSocket upgrade does) raises
``automat.NoTransition`` out of ``connectionLost``. ``tests/test_connector.py`` pins
both that behaviour of Twisted and our ``Handshaking`` -> ``Waiting`` transition.

Sans-IO apart from what it is given: an ``IStreamClientEndpoint``, a protocol factory,
an ``IReactorTime`` and the hooks of ``IConnectorHooks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol as TypingProtocol

from automat import TypeMachineBuilder, pep614
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

# The names ``Connector.state`` reports (and ``list_sessions()`` shows).
IDLE = "idle"
CONNECTING = "connecting"
CONNECTED = "connected"
BACKING_OFF = "backing_off"
STOPPING = "stopping"
STOPPED = "stopped"
FAILED = "failed"


class IConnectorHooks(Interface):
    """What the connector tells, and asks of, the link that owns it."""

    def connected(protocol):
        """``protocol`` is up (``handshake_done`` was called for it)."""

    def disconnected(reason):
        """The connection that was up is gone (lost, or closed by ``stop``); ``reason``: str."""

    def gave_up(reason):
        """``max_attempts`` failed attempts in a row: no more attempts."""

    def close(protocol, reason):
        """Close an up connection gracefully (``stop``); its loss is reported later."""

    def abort(protocol):
        """Drop a connection that is not up yet (timeout, ``stop``)."""

    def describe(protocol):
        """A short text for the 'connected (...)' log line, e.g. 'raw frames'."""


class _Inputs(TypingProtocol):
    def start(self) -> None:
        "Begin connecting (again); nothing while already at it."

    def stop(self) -> None:
        "Stop connecting and close the connection; the stop waiters fire once it is gone."

    def transport_up(self, protocol: object) -> None:
        "The endpoint connected (TCP/TLS): the WebSocket handshake runs now."

    def handshake_done(self, protocol: object) -> None:
        "The link is usable over ``protocol``."

    def timed_out(self) -> None:
        "The attempt ran out of ``connect_timeout``."

    def stable(self) -> None:
        "The connection has been up for ``stable_after`` seconds."

    def failed(self, reason: str) -> None:
        "The attempt or the connection ended; more attempts are allowed."

    def exhausted(self, reason: str) -> None:
        "The attempt or the connection ended, and it was the last allowed."

    def retry(self) -> None:
        "The backoff is over."


@dataclass
class _Core:
    endpoint: IStreamClientEndpoint
    factory: object
    clock: IReactorTime
    hooks: object                       # IConnectorHooks
    retry_delay: Callable[[int], float]  # failed attempts in a row -> seconds
    connect_timeout: float
    stable_after: float
    max_attempts: int = 0
    name: str = "connection"
    peer: str = "?"
    log: Logger = field(default_factory=Logger)

    state: str = IDLE
    attempt: int = 0                    # THE attempt counter (see the module docstring)
    connects: int = 0
    last_error: Optional[str] = None
    protocol: object = None             # the connection being set up or up
    attempt_started: float = 0.0
    connected_at: Optional[float] = None
    next_retry_at: Optional[float] = None
    abort_reason: Optional[str] = None  # our own account of why we dropped the connection
    stop_waiters: list = field(default_factory=list)

    def exhausted(self) -> bool:
        return bool(self.max_attempts) and self.attempt >= self.max_attempts

    def finish_stopping(self):
        self.state = STOPPED
        self.protocol = None
        self.next_retry_at = None
        waiters, self.stop_waiters = self.stop_waiters, []
        for d in waiters:
            d.callback(None)


@dataclass
class _Handshake:
    protocol: object
    timer: IDelayedCall


@dataclass
class _Connection:
    protocol: object
    stable_timer: Optional[IDelayedCall]


def _cancel(call):
    if call is not None and call.active():
        call.cancel()


def _build_machine():
    m = TypeMachineBuilder(_Inputs, _Core)

    # -- state data: made on entering the state ---------------------------------------

    def begin_attempt(c: _Inputs, s: _Core) -> Deferred:
        s.attempt += 1
        s.state = CONNECTING
        s.protocol = None
        s.abort_reason = None
        s.next_retry_at = None
        s.attempt_started = s.clock.seconds()
        s.log.info("{name}: connecting (attempt {attempt})", name=s.name, attempt=s.attempt)
        d = s.endpoint.connect(s.factory)
        d.addCallbacks(c.transport_up, lambda f: _attempt_failed(c, s, f))
        return d

    def begin_handshake(c: _Inputs, s: _Core, protocol: object) -> _Handshake:
        s.protocol = protocol
        left = s.connect_timeout - (s.clock.seconds() - s.attempt_started)
        return _Handshake(protocol, s.clock.callLater(max(left, 0.001), c.timed_out))

    def begin_connection(c: _Inputs, s: _Core, protocol: object) -> _Connection:
        s.state = CONNECTED
        s.connects += 1
        s.connected_at = s.clock.seconds()
        timer = s.clock.callLater(s.stable_after, c.stable) if s.stable_after > 0 else None
        return _Connection(protocol, timer)

    def begin_wait(c: _Inputs, s: _Core, reason: str) -> IDelayedCall:
        s.state = BACKING_OFF
        s.last_error = reason
        s.protocol = None
        s.connected_at = None
        delay = s.retry_delay(max(s.attempt, 1))
        s.next_retry_at = s.clock.seconds() + delay
        return s.clock.callLater(delay, c.retry)

    Idle = m.state("Idle")
    Connecting = m.state("Connecting", begin_attempt)
    Handshaking = m.state("Handshaking", begin_handshake)
    Connected = m.state("Connected", begin_connection)
    Waiting = m.state("Waiting", begin_wait)
    Disconnecting = m.state("Disconnecting")
    Stopped = m.state("Stopped")
    GaveUp = m.state("GaveUp")

    # -- the table ---------------------------------------------------------------------
    # (state, input) -> new state, with the output below each group. Inputs a state does
    # not list are not expected there; the Connector facade filters stale ones.

    Idle.upon(_Inputs.start).to(Connecting).returns(None)
    Stopped.upon(_Inputs.start).to(Connecting).returns(None)
    Connecting.upon(_Inputs.start).loop().returns(None)
    Handshaking.upon(_Inputs.start).loop().returns(None)
    Connected.upon(_Inputs.start).loop().returns(None)
    Waiting.upon(_Inputs.start).loop().returns(None)
    Disconnecting.upon(_Inputs.start).loop().returns(None)   # stopping wins; start again after
    Connecting.upon(_Inputs.transport_up).to(Handshaking).returns(None)

    GaveUp.upon(_Inputs.start).to(Connecting).returns(None)  # Connector.start resets the count

    @pep614(Handshaking.upon(_Inputs.handshake_done).to(Connected))
    def up(c: _Inputs, s: _Core, hs: _Handshake, protocol: object) -> None:
        _cancel(hs.timer)
        s.log.info("{name}: connected ({how}) at attempt {attempt}", name=s.name,
                   how=s.hooks.describe(protocol), attempt=s.attempt)
        s.hooks.connected(protocol)

    @pep614(Handshaking.upon(_Inputs.timed_out).loop())
    def timed_out(c: _Inputs, s: _Core, hs: _Handshake) -> None:
        s.abort_reason = (f"timed out: the connection to {s.peer} (TCP, WebSocket upgrade, welcome) was not "
                          f"ready within CONNECT_TIMEOUT_SEC={s.connect_timeout:g}s")
        s.hooks.abort(hs.protocol)   # its loss comes back as failed/exhausted

    @pep614(Connected.upon(_Inputs.stable).loop())
    def stable(c: _Inputs, s: _Core, conn: _Connection) -> None:
        s.log.debug("{name}: connection stable; failed-attempt count reset from {attempt}",
                    name=s.name, attempt=s.attempt)
        conn.stable_timer = None
        s.attempt = 0

    def log_failed(s: _Core, reason: str) -> None:
        s.log.warn("{name}: attempt {attempt} failed: {error}; backing off, retrying in {delay:.3f}s "
                   "({attempt} failed attempt(s) in a row)", name=s.name, attempt=s.attempt, error=reason,
                   delay=s.next_retry_at - s.clock.seconds())

    @pep614(Connecting.upon(_Inputs.failed).to(Waiting))
    def connect_failed(c: _Inputs, s: _Core, attempt: Deferred, reason: str) -> None:
        log_failed(s, reason)

    @pep614(Handshaking.upon(_Inputs.failed).to(Waiting))
    def handshake_failed(c: _Inputs, s: _Core, hs: _Handshake, reason: str) -> None:
        _cancel(hs.timer)
        log_failed(s, reason)

    @pep614(Connected.upon(_Inputs.failed).to(Waiting))
    def connection_lost(c: _Inputs, s: _Core, conn: _Connection, reason: str) -> None:
        _cancel(conn.stable_timer)
        delay = s.next_retry_at - s.clock.seconds()
        if s.attempt == 0:
            s.log.warn("{name}: connection lost: {error}; reconnecting in {delay:.3f}s (attempt 1 next)",
                       name=s.name, error=reason, delay=delay)
        else:
            s.log.warn("{name}: connection lost: {error}; it did not stay up for RECONNECT_MAX_SEC, so attempt "
                       "{attempt} counts as failed; backing off, retrying in {delay:.3f}s ({attempt} failed "
                       "attempt(s) in a row)", name=s.name, error=reason, attempt=s.attempt, delay=delay)
        s.hooks.disconnected(reason)

    def give_up(s: _Core, reason: str) -> None:
        was_up = s.state == CONNECTED
        s.state = FAILED
        s.last_error = reason
        s.protocol = None
        s.connected_at = s.next_retry_at = None
        s.log.error("{name}: attempt {attempt} failed: {error}; giving up after {attempt} failed attempts in a "
                    "row (RECONNECT_MAX_ATTEMPTS={max})", name=s.name, attempt=s.attempt, error=reason,
                    max=s.max_attempts)
        if was_up:
            s.hooks.disconnected(reason)
        s.hooks.gave_up(reason)

    @pep614(Connecting.upon(_Inputs.exhausted).to(GaveUp))
    def give_up_connecting(c: _Inputs, s: _Core, attempt: Deferred, reason: str) -> None:
        give_up(s, reason)

    @pep614(Handshaking.upon(_Inputs.exhausted).to(GaveUp))
    def give_up_handshaking(c: _Inputs, s: _Core, hs: _Handshake, reason: str) -> None:
        _cancel(hs.timer)
        give_up(s, reason)

    @pep614(Connected.upon(_Inputs.exhausted).to(GaveUp))
    def give_up_connected(c: _Inputs, s: _Core, conn: _Connection, reason: str) -> None:
        _cancel(conn.stable_timer)
        give_up(s, reason)

    Waiting.upon(_Inputs.retry).to(Connecting).returns(None)   # begin_attempt logs

    # stopping

    @pep614(Idle.upon(_Inputs.stop).to(Stopped))
    @pep614(Stopped.upon(_Inputs.stop).to(Stopped))
    @pep614(GaveUp.upon(_Inputs.stop).to(Stopped))
    def stop_at_once(c: _Inputs, s: _Core) -> None:
        s.finish_stopping()

    @pep614(Waiting.upon(_Inputs.stop).to(Stopped))
    def stop_waiting(c: _Inputs, s: _Core, retry_call: IDelayedCall) -> None:
        _cancel(retry_call)
        s.finish_stopping()

    @pep614(Connecting.upon(_Inputs.stop).to(Disconnecting))
    def stop_connecting(c: _Inputs, s: _Core, attempt: Deferred) -> None:
        s.state = STOPPING
        attempt.cancel()   # its errback comes back as failed

    @pep614(Handshaking.upon(_Inputs.stop).to(Disconnecting))
    def stop_handshaking(c: _Inputs, s: _Core, hs: _Handshake) -> None:
        s.state = STOPPING
        _cancel(hs.timer)
        s.hooks.abort(hs.protocol)

    @pep614(Connected.upon(_Inputs.stop).to(Disconnecting))
    def stop_connected(c: _Inputs, s: _Core, conn: _Connection) -> None:
        s.state = STOPPING
        _cancel(conn.stable_timer)
        s.hooks.disconnected("the link is closing")
        s.hooks.close(conn.protocol, "the link was closed")

    @pep614(Disconnecting.upon(_Inputs.failed).to(Stopped))
    @pep614(Disconnecting.upon(_Inputs.exhausted).to(Stopped))
    def stopped(c: _Inputs, s: _Core, reason: str) -> None:
        s.finish_stopping()

    Disconnecting.upon(_Inputs.stop).loop().returns(None)
    Disconnecting.upon(_Inputs.handshake_done).loop().returns(None)  # too late: being dropped
    Disconnecting.upon(_Inputs.timed_out).loop().returns(None)

    @pep614(Disconnecting.upon(_Inputs.transport_up).loop())
    def too_late(c: _Inputs, s: _Core, protocol: object) -> None:
        s.protocol = protocol   # an endpoint that could not cancel: drop what it made
        s.hooks.abort(protocol)

    return m.build()


def _attempt_failed(c, s, failure: Failure):
    if failure.check(CancelledError):
        text = "the attempt was cancelled"
    else:
        text = f"cannot connect to {s.peer}: {failure.getErrorMessage() or type(failure.value).__name__}"
    (c.exhausted if s.exhausted() and s.state != STOPPING else c.failed)(text)


_Machine = _build_machine()


class Connector:
    """Keeps one connection up. ``start``, ``stop`` and ``when_connected`` for the link; the
    link's protocol reports ``handshake_done`` and ``lost``. See the module docstring."""

    def __init__(self, endpoint, factory, clock, hooks, retry_delay, *, connect_timeout, stable_after,
                 max_attempts=0, name="connection", peer="?", log=None):
        self._core = _Core(endpoint, factory, clock, hooks, retry_delay, connect_timeout, stable_after,
                           max_attempts, name, peer, log or Logger())
        self._machine = _Machine(self._core)

    # what the link reads
    state = property(lambda self: self._core.state)
    attempt = property(lambda self: self._core.attempt)
    connects = property(lambda self: self._core.connects)
    last_error = property(lambda self: self._core.last_error)
    next_retry_at = property(lambda self: self._core.next_retry_at)
    protocol = property(lambda self: self._core.protocol)   # set up or up

    def start(self) -> None:
        """Begin connecting; after giving up, begin again from attempt 1."""
        if self._core.state == FAILED:
            self._core.attempt = 0
        self._machine.start()

    def stop(self) -> Deferred:
        """Deferred firing once the connection is closed and no attempt is running."""
        if self._core.state in (STOPPED, IDLE):
            self._machine.stop()
            return succeed(None)
        d = Deferred()
        self._core.stop_waiters.append(d)
        self._machine.stop()
        return d

    # reported by the link about its protocol

    def handshake_done(self, protocol) -> None:
        if protocol is self._core.protocol:
            self._machine.handshake_done(protocol)

    def lost(self, protocol, reason: str) -> None:
        """``protocol``'s connection ended (or its handshake failed) for ``reason``."""
        s = self._core
        if protocol is not s.protocol:
            return  # a connection we already let go
        reason = s.abort_reason or reason
        s.abort_reason = None
        (self._machine.exhausted if s.exhausted() and s.state not in (STOPPING, IDLE)
         else self._machine.failed)(reason)

    def drop(self, reason: str) -> bool:
        """Drop the current connection (set up or up); the loss is a failed attempt, then a retry."""
        s = self._core
        if s.protocol is None or s.state == STOPPING:
            return False
        if s.state == CONNECTED:
            s.hooks.close(s.protocol, reason)
        else:
            s.abort_reason = reason
            s.hooks.abort(s.protocol)
        return True
