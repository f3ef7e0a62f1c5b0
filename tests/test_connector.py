"""The link connector's transitions, one test each, with ``task.Clock`` and a memory endpoint.

No sockets: ``MemoryEndpoint`` hands each ``connect`` back to the test as a Deferred the
test fires (as Twisted's own ``ClientServiceTests`` do), and the "protocols" are plain
objects the hooks record. The hooks are a recording fake because the connector's only
collaborator here is the link, which is what these tests leave out on purpose.
"""

from automat import NoTransition
from twisted.application.internet import ClientService
from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, globalLogPublisher, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from wsprovider import connector
from wsprovider.connector import Connector


@implementer(IStreamClientEndpoint)
class MemoryEndpoint:
    """Each ``connect`` waits in ``attempts`` until the test fires or fails it."""

    def __init__(self):
        self.attempts = []
        self.cancelled = 0

    def connect(self, factory):
        def cancel(d):
            self.cancelled += 1
            d.errback(defer.CancelledError())
        d = defer.Deferred(cancel)
        self.attempts.append((factory, d))
        return d

    def succeed(self):
        factory, d = self.attempts[-1]
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        d.callback(proto)
        return proto

    def refuse(self):
        self.attempts[-1][1].errback(ConnectionRefusedError("refused"))


class Hooks:
    def __init__(self):
        self.calls = []

    def connected(self, protocol):
        self.calls.append(("connected", protocol))

    def disconnected(self, reason):
        self.calls.append(("disconnected", reason))

    def gave_up(self, reason):
        self.calls.append(("gave_up", reason))

    def close(self, protocol, reason):
        self.calls.append(("close", protocol))

    def abort(self, protocol):
        self.calls.append(("abort", protocol))

    def describe(self, protocol):
        return "test frames"


class Logged:
    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, level=LogLevel.info):
        return [formatEvent(e) for e in self.events
                if e.get("log_namespace") == "test.connector" and e["log_level"] >= level]


class ConnectorTests(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.endpoint = MemoryEndpoint()
        self.hooks = Hooks()
        self.log = Logged(self)
        self.delays = []

    def make(self, max_attempts=0, timeout=5.0, stable_after=10.0):
        def delay(failures):
            self.delays.append(failures)
            return 1.0 * failures
        from twisted.logger import Logger
        return Connector(self.endpoint, Factory.forProtocol(Protocol), self.clock, self.hooks, delay,
                         connect_timeout=timeout, stable_after=stable_after, max_attempts=max_attempts,
                         name="link L", peer="h:1", log=Logger(namespace="test.connector"))

    def connect(self, c):
        proto = self.endpoint.succeed()
        c.handshake_done(proto)
        return proto

    # Idle

    def test_idle_start_connects(self):
        c = self.make()
        self.assertEqual(c.state, connector.IDLE)
        c.start()
        self.assertEqual((c.state, c.attempt, len(self.endpoint.attempts)), (connector.CONNECTING, 1, 1))
        self.assertEqual(self.log.lines(), ["link L: connecting (attempt 1)"])

    def test_idle_stop_is_immediate(self):
        c = self.make()
        d = c.stop()
        self.assertEqual(self.successResultOf(d), None)
        self.assertEqual(c.state, connector.STOPPED)

    # Connecting

    def test_connecting_transport_up_then_handshake_done_connects(self):
        c = self.make()
        c.start()
        proto = self.endpoint.succeed()
        self.assertEqual(c.state, connector.CONNECTING)   # Handshaking: still connecting
        self.assertIs(c.protocol, proto)
        c.handshake_done(proto)
        self.assertEqual((c.state, c.connects), (connector.CONNECTED, 1))
        self.assertEqual(self.hooks.calls, [("connected", proto)])
        self.assertIn("link L: connected (test frames) at attempt 1", self.log.lines())

    def test_connecting_refused_backs_off_with_one_count(self):
        c = self.make()
        c.start()
        self.endpoint.refuse()
        self.assertEqual((c.state, c.attempt), (connector.BACKING_OFF, 1))
        self.assertEqual(self.delays, [1])
        self.assertIn("cannot connect to h:1", c.last_error)
        self.clock.advance(1.0)
        self.assertEqual((c.state, c.attempt), (connector.CONNECTING, 2))
        self.endpoint.refuse()
        self.assertEqual(self.delays, [1, 2])
        self.assertEqual(self.log.lines(), [
            "link L: connecting (attempt 1)",
            "link L: attempt 1 failed: cannot connect to h:1: Connection was refused by other side: refused.; "
            "backing off, retrying in 1.000s (1 failed attempt(s) in a row)",
            "link L: connecting (attempt 2)",
            "link L: attempt 2 failed: cannot connect to h:1: Connection was refused by other side: refused.; "
            "backing off, retrying in 2.000s (2 failed attempt(s) in a row)",
        ])

    def test_connecting_exhausted_gives_up(self):
        c = self.make(max_attempts=2)
        c.start()
        self.endpoint.refuse()
        self.clock.advance(1.0)
        self.endpoint.refuse()
        self.assertEqual((c.state, c.attempt), (connector.FAILED, 2))
        self.assertEqual([k for k, _ in self.hooks.calls], ["gave_up"])
        self.assertFalse(self.clock.getDelayedCalls())
        self.assertIn("giving up after 2 failed attempts in a row (RECONNECT_MAX_ATTEMPTS=2)",
                      self.log.lines()[-1])

    def test_connecting_stop_cancels_the_attempt(self):
        c = self.make()
        c.start()
        d = c.stop()
        self.assertEqual(self.endpoint.cancelled, 1)
        self.assertEqual(self.successResultOf(d), None)
        self.assertEqual(c.state, connector.STOPPED)

    # Handshaking

    def test_handshaking_lost_backs_off_no_notransition(self):
        """The case ClientService(prepareConnection=...) cannot take (see the Twisted pin below)."""
        c = self.make()
        c.start()
        proto = self.endpoint.succeed()
        c.lost(proto, "the server refused the WebSocket upgrade: HTTP 401 Unauthorized")
        self.assertEqual((c.state, c.attempt), (connector.BACKING_OFF, 1))
        self.assertIn("HTTP 401", c.last_error)
        self.assertEqual(self.hooks.calls, [])   # never connected: nothing to tell the link

    def test_handshaking_times_out_within_the_attempt_budget(self):
        c = self.make(timeout=5.0)
        c.start()
        self.clock.advance(2.0)                 # TCP took 2 s of the 5
        proto = self.endpoint.succeed()
        self.clock.advance(2.9)
        self.assertEqual(self.hooks.calls, [])
        self.clock.advance(0.2)
        self.assertEqual(self.hooks.calls, [("abort", proto)])
        c.lost(proto, "connection aborted")     # what aborting leads to
        self.assertIn("timed out", c.last_error)
        self.assertIn("5s", c.last_error)
        self.assertEqual(c.state, connector.BACKING_OFF)

    def test_handshaking_exhausted_gives_up(self):
        c = self.make(max_attempts=1)
        c.start()
        c.lost(self.endpoint.succeed(), "refused")
        self.assertEqual(c.state, connector.FAILED)

    def test_handshaking_stop_aborts(self):
        c = self.make()
        c.start()
        proto = self.endpoint.succeed()
        d = c.stop()
        self.assertEqual(self.hooks.calls, [("abort", proto)])
        self.assertNoResult(d)
        c.handshake_done(proto)                 # too late: ignored
        c.lost(proto, "aborted")
        self.successResultOf(d)
        self.assertEqual(c.state, connector.STOPPED)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_stale_protocol_events_are_ignored(self):
        c = self.make()
        c.start()
        old = self.endpoint.succeed()
        c.lost(old, "gone")
        self.clock.advance(1.0)
        new = self.endpoint.succeed()
        c.lost(old, "gone again")               # the old connection's late report
        c.handshake_done(old)
        self.assertEqual(c.state, connector.CONNECTING)
        c.handshake_done(new)
        self.assertEqual(c.state, connector.CONNECTED)

    # Connected

    def test_connected_lost_soon_counts_as_a_failed_attempt(self):
        c = self.make(stable_after=10.0)
        c.start()
        proto = self.connect(c)
        self.clock.advance(1.0)
        c.lost(proto, "closed (code 1000)")
        self.assertEqual((c.state, c.attempt), (connector.BACKING_OFF, 1))
        self.assertEqual(self.hooks.calls[-1], ("disconnected", "closed (code 1000)"))
        self.clock.advance(1.0)
        self.connect(c)
        c.lost(c.protocol, "closed again")
        self.assertEqual(c.attempt, 2)          # the backoff keeps growing
        self.assertEqual(self.delays, [1, 2])
        self.assertIn("attempt 2 counts as failed", self.log.lines()[-1])
        self.assertIn("(2 failed attempt(s) in a row)", self.log.lines()[-1])

    def test_connected_stable_resets_the_count(self):
        c = self.make(stable_after=10.0)
        c.start()
        self.endpoint.refuse()
        self.clock.advance(1.0)
        proto = self.connect(c)
        self.assertEqual(c.attempt, 2)
        self.clock.advance(10.0)
        self.assertEqual(c.attempt, 0)
        c.lost(proto, "server restart")
        self.assertEqual(self.delays, [1, 1])   # retried after the base delay
        self.assertIn("reconnecting in 1.000s (attempt 1 next)", self.log.lines()[-1])
        self.clock.advance(1.0)
        self.assertEqual(c.attempt, 1)
        self.assertEqual(self.log.lines()[-1], "link L: connecting (attempt 1)")

    def test_connected_exhausted_gives_up(self):
        c = self.make(max_attempts=1)
        c.start()
        proto = self.connect(c)
        c.lost(proto, "closed")
        self.assertEqual(c.state, connector.FAILED)
        self.assertEqual([k for k, _ in self.hooks.calls], ["connected", "disconnected", "gave_up"])

    def test_connected_stop_closes_then_stops(self):
        c = self.make()
        c.start()
        proto = self.connect(c)
        d = c.stop()
        self.assertEqual(self.hooks.calls[1:], [("disconnected", "the link is closing"), ("close", proto)])
        self.assertEqual(c.state, connector.STOPPING)
        c.start()                                # stopping wins
        self.assertEqual(c.state, connector.STOPPING)
        c.lost(proto, "closed (code 1000)")
        self.successResultOf(d)
        self.assertEqual(c.state, connector.STOPPED)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_drop_connected_reconnects(self):
        c = self.make()
        c.start()
        proto = self.connect(c)
        self.assertTrue(c.drop("closed by the service"))
        self.assertEqual(self.hooks.calls[-1], ("close", proto))
        c.lost(proto, "closed (code 1000)")
        self.assertEqual(c.state, connector.BACKING_OFF)

    def test_drop_while_handshaking_uses_its_reason(self):
        c = self.make()
        c.start()
        proto = self.endpoint.succeed()
        c.drop("dropped by the test")
        c.lost(proto, "aborted")
        self.assertEqual(c.last_error, "dropped by the test")

    # Waiting, Stopped, GaveUp

    def test_waiting_stop_cancels_the_retry(self):
        c = self.make()
        c.start()
        self.endpoint.refuse()
        self.successResultOf(c.stop())
        self.assertEqual(c.state, connector.STOPPED)
        self.assertFalse(self.clock.getDelayedCalls())

    def test_stopped_start_connects_again(self):
        c = self.make()
        c.start()
        self.endpoint.refuse()
        c.stop()
        c.start()
        self.assertEqual(c.state, connector.CONNECTING)

    def test_gave_up_start_begins_from_attempt_one(self):
        c = self.make(max_attempts=1)
        c.start()
        self.endpoint.refuse()
        self.assertEqual(c.state, connector.FAILED)
        c.start()
        self.assertEqual((c.state, c.attempt), (connector.CONNECTING, 1))
        self.successResultOf(c.stop())


class PrepareConnectionPinTests(unittest.TestCase):
    """Pins why the link does not use ``ClientService(prepareConnection=...)``.

    If this starts failing, Twisted has fixed the missing transition and the connector's
    docstring (and docs/client-mode.rst) should be revisited.
    """

    def test_twisted_raises_notransition_when_lost_during_prepare(self):
        endpoint = MemoryEndpoint()
        service = ClientService(endpoint, Factory.forProtocol(Protocol), clock=task.Clock(),
                                prepareConnection=lambda proto: defer.Deferred())  # the handshake, pending
        service.startService()
        factory, d = endpoint.attempts[-1]
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        d.callback(proto)
        self.assertRaises(NoTransition, proto.connectionLost, Failure(ConnectionDone()))
