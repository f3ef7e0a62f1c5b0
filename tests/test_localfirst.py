"""wsprovider.lattice.localfirst: workers deliver locally and put on NATS only what another needs.

The interest table is tested without I/O; the lattice itself as two workers (index 0 and 1
of 2) on one real nats-server: the whole lattice conformance suite with every body
crossing workers, then what is particular to local-first (what stays off NATS, that every
subscriber and every queue group gets a message once, and a restarted worker).
"""

import secrets

from twisted.internet import defer, reactor
from twisted.trial import unittest

from wsprovider.interfaces import ISynchronousDispatch
from wsprovider.lattice.localfirst import InterestTable, LocalFirstLattice
from wsprovider.lattice.nats import NatsLattice
from wsprovider.message import BrokerMessage
from wsprovider.nats import NatsClient

from .natsserver import NatsServer
from .test_lattice_conformance import NATS_CAPABILITIES, Collector, LatticeConformanceMixin

HANDLERS = "_ws.handlers.echo"  # a handler link's queue group (every worker has a member)


class InterestTableTests(unittest.TestCase):
    def test_plain_interest_elsewhere_is_needed(self):
        t = InterestTable()
        self.assertFalse(t.needs("chat.1", set()))
        t.add(1, "chat.>", None)
        self.assertTrue(t.needs("chat.1", set()))
        self.assertFalse(t.needs("news.1", set()))

    def test_a_queue_group_served_here_is_not_needed_elsewhere(self):
        t = InterestTable()
        t.add(1, "work.*", "g")
        self.assertTrue(t.needs("work.1", set()))
        self.assertFalse(t.needs("work.1", {"g"}))
        t.add(1, "work.>", None)
        self.assertTrue(t.needs("work.1", {"g"}))

    def test_counts_and_removal(self):
        t = InterestTable()
        t.add(1, "a.b", None)
        t.add(1, "a.b", None)
        t.remove(1, "a.b", None)
        self.assertTrue(t.needs("a.b", set()))
        t.remove(1, "a.b", None)
        self.assertFalse(t.needs("a.b", set()))
        t.remove(1, "a.b", None)  # more removals than adds: nothing breaks
        self.assertEqual(t.workers(), set())

    def test_replace_forgets_what_a_worker_held(self):
        t = InterestTable()
        t.add(1, "old.>", None)
        t.add(2, "other.>", None)
        t.replace(1, [["new.>", None, 2]])
        self.assertFalse(t.needs("old.x", set()))
        self.assertTrue(t.needs("new.x", set()))
        self.assertTrue(t.needs("other.x", set()))
        self.assertEqual(t.workers(), {1, 2})

    def test_first_token_wildcards_do_not_see_private_subjects(self):
        t = InterestTable()
        t.add(1, ">", None)
        self.assertTrue(t.needs("chat.x", set()))
        self.assertFalse(t.needs("_ws.session.abc", set()))


class _Workers:
    """Two local-first workers on one real nats-server, made per test."""

    sync_timeout = 0.5

    @defer.inlineCallbacks
    def _server(self):
        if getattr(self, "server", None) is None:
            self.server = NatsServer(self)
            yield self.server.start()
        return self.server

    @defer.inlineCallbacks
    def worker(self, index, count=2):
        server = yield self._server()
        client = NatsClient(server.url, reactor=reactor, name=f"worker-{index}")
        bus = NatsLattice(client, reactor=reactor)
        lattice = LocalFirstLattice(bus, index, count, reactor=reactor, sync_timeout=self.sync_timeout)
        yield lattice.start()
        yield lattice.when_connected()
        yield self.synced(lattice)
        return lattice

    @defer.inlineCallbacks
    def synced(self, lattice):
        for _ in range(100):  # bounded: the hello round takes at most sync_timeout
            if lattice.synced:
                return
            yield _later(self.sync_timeout / 10)
        self.fail("the worker did not synchronise")


def _later(seconds):
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)


class LocalFirstConformance(_Workers, LatticeConformanceMixin, unittest.TestCase):
    """The shared semantics, with ``self.lattice`` worker 0 and ``self.peer`` worker 1."""

    capabilities = NATS_CAPABILITIES | {ISynchronousDispatch}
    _made = 0

    def make_lattice(self):
        index = self._made % 2
        self._made += 1
        return self.worker(index)


class LocalFirstTests(_Workers, unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.a = yield self.worker(0)
        self.addCleanup(self.a.close)
        self.b = yield self.worker(1)
        self.addCleanup(self.b.close)

    @defer.inlineCallbacks
    def both(self, pattern, queue=None):
        """A Collector subscribed on each worker."""
        got = []
        for lattice in (self.a, self.b):
            c = Collector()
            sub = yield lattice.subscribe(pattern, c, queue)
            self.addCleanup(sub.unsubscribe)
            got.append(c)
        return got

    @defer.inlineCallbacks
    def session_on(self, lattice):
        """A session's address subscribed on ``lattice``: (address, its Collector)."""
        address = f"_ws.session.{secrets.token_hex(8)}"
        inbox = Collector()
        sub = yield lattice.subscribe(address, inbox)
        self.addCleanup(sub.unsubscribe)
        return address, inbox

    @defer.inlineCallbacks
    def barrier(self, sender, receiver):
        """Everything ``sender`` put on NATS so far has reached ``receiver``."""
        marker = Collector()
        subject = f"_barrier.{secrets.token_hex(4)}"
        sub = yield receiver.subscribe(subject, marker)  # announced: acknowledged by the sender
        yield sender.publish(BrokerMessage(subject, b""))
        yield marker.wait(1)
        yield sub.unsubscribe()

    @defer.inlineCallbacks
    def test_session_local_echo_never_touches_nats(self):
        # The handler's queue group on both workers, a session address on worker 0: the
        # session's message to the handler and the handler's reply stay in worker 0.
        address, inbox = yield self.session_on(self.a)
        served = []

        def echo_on(lattice, name):
            def handle(msg):
                served.append(name)
                return lattice.publish(BrokerMessage(msg.reply_to, msg.body))
            return handle

        for lattice, name in ((self.a, "a"), (self.b, "b")):
            s = yield lattice.subscribe("echo.>", echo_on(lattice, name), HANDLERS)
            self.addCleanup(s.unsubscribe)
        before = self.a.bus_publishes
        for i in range(20):
            self.assertIsNone(self.a.dispatch(BrokerMessage("echo.x", b"%d" % i, address)))
        self.assertEqual(inbox.bodies, [b"%d" % i for i in range(20)])
        self.assertEqual(served, ["a"] * 20)
        self.assertEqual(self.a.bus_publishes, before)

    @defer.inlineCallbacks
    def test_a_subscriber_on_the_other_worker_gets_it_once_and_the_group_serves_once(self):
        handled = yield self.both("work.>", HANDLERS)
        watcher = Collector()
        sub = yield self.b.subscribe("work.>", watcher)  # a peer's subscription on worker 1
        self.addCleanup(sub.unsubscribe)
        local = Collector()
        sub = yield self.a.subscribe("work.>", local)
        self.addCleanup(sub.unsubscribe)
        for i in range(5):
            yield self.a.publish(BrokerMessage("work.item", b"%d" % i))
        yield self.barrier(self.a, self.b)
        self.assertEqual(watcher.bodies, [b"%d" % i for i in range(5)])
        self.assertEqual(local.bodies, [b"%d" % i for i in range(5)])       # not again from NATS
        self.assertEqual(len(handled[0].items) + len(handled[1].items), 5)  # the group: once each
        self.assertEqual(len(handled[0].items), 5)                          # here, locally

    @defer.inlineCallbacks
    def test_subscribed_means_announced(self):
        # Once worker 1's subscribe has fired, worker 0 already knows (no wait, no poll).
        sub = yield self.b.subscribe("news.>", Collector())
        self.assertTrue(self.a.interest.needs("news.1", set()))
        yield sub.unsubscribe()
        yield self.barrier(self.b, self.a)
        self.assertFalse(self.a.interest.needs("news.1", set()))

    @defer.inlineCallbacks
    def test_a_session_on_the_other_worker_is_reached_through_nats(self):
        address, inbox = yield self.session_on(self.b)
        handler = yield self.both("_ws.session.>", HANDLERS)  # a (rare) handler on session traffic
        yield self.a.publish(BrokerMessage(address, b"hello"))
        yield inbox.wait(1)
        self.assertEqual(inbox.bodies, [b"hello"])
        self.assertEqual(len(handler[0].items) + len(handler[1].items), 1)
        yield self.a.publish_to_address(address, BrokerMessage("chat.x", b"direct"), 5000)
        yield inbox.wait(2)
        self.assertEqual(inbox.items[1].subject, "chat.x")

    @defer.inlineCallbacks
    def test_addressed_delivery_to_a_local_session_stays_here(self):
        address, inbox = yield self.session_on(self.a)
        before = self.a.bus_publishes
        yield self.a.publish_to_address(address, BrokerMessage("chat.x", b"direct", "chat.reply"), 5000)
        self.assertEqual([(m.subject, m.body, m.reply_to) for m in inbox.items], [("chat.x", b"direct", "chat.reply")])
        self.assertEqual(self.a.bus_publishes, before)

    @defer.inlineCallbacks
    def test_a_broadcast_reaches_each_worker_once(self):
        got = yield self.both("_ws.broadcast.>")
        yield self.a.publish(BrokerMessage("_ws.broadcast.news", b"all"))
        yield self.barrier(self.a, self.b)
        yield got[1].wait(1)
        self.assertEqual((got[0].bodies, got[1].bodies), ([b"all"], [b"all"]))

    @defer.inlineCallbacks
    def test_nothing_here_means_nats_semantics(self):
        far = Collector()
        sub = yield self.b.subscribe("only.there", far)
        self.addCleanup(sub.unsubscribe)
        yield self.a.publish(BrokerMessage("only.there", b"x"))
        yield far.wait(1)
        self.assertEqual(far.bodies, [b"x"])

    @defer.inlineCallbacks
    def test_a_restarted_worker_replaces_what_its_predecessor_held(self):
        sub = yield self.b.subscribe("gone.>", Collector())
        self.assertTrue(self.a.interest.needs("gone.x", set()))
        yield self.b.close()   # worker 1 dies without unsubscribing
        self.assertIsNotNone(sub)
        again = yield self.worker(1)  # its successor says hello with what it holds: nothing
        self.addCleanup(again.close)
        self.assertFalse(self.a.interest.needs("gone.x", set()))
        self.assertEqual(again.present, {0})
