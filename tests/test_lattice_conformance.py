"""The lattice conformance suite: one set of test bodies every ``ILattice`` must pass.

``LatticeConformanceMixin`` holds the bodies; each concrete ``TestCase`` below is one
lattice (its class name is in every test id): the embedded ``LocalLattice``, the
``NatsLattice`` on a real single ``nats-server``, and the ``NatsLattice`` on a real
3-node cluster, its two instances on different nodes.

Where lattices differ, the difference is a declared capability (``wsprovider.interfaces``):
each body asks ``ICapability.providedBy(lattice)`` and asserts the capability's behaviour
when it is provided and the documented alternative when it is not. Nothing is skipped.
Timers and sockets left behind by ``close()`` fail every test through trial's
dirty-reactor check.

Adding a lattice (docs/developing.rst, "Adding a lattice")::

    class MyLatticeConformance(LatticeConformanceMixin, unittest.TestCase):
        capabilities = frozenset({IClusteredLattice, ...})   # exactly what it declares

        def make_lattice(self):          # may return a Deferred
            return MyLattice(...)        # started and ready to carry messages

        def make_peer_lattice(self):     # optional: a second instance on the same bus
            ...
"""

from __future__ import annotations

import secrets

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from wsprovider.interfaces import (IAcknowledgedPublish, IAddressedDelivery, IBoundedPayload,
                                   IClusteredLattice, IConnectionState, IExactBroadcastCount,
                                   ILattice, IStartable, ISubscription, ISynchronousDispatch)
from wsprovider.lattice.local import LocalLattice
from wsprovider.lattice.nats import NatsLattice
from wsprovider.message import (BrokerMessage, MessagingError, NoResponders, NotConnected,
                                RequestTimeout)
from wsprovider.nats import NatsClient

from .natsserver import NatsServer, start_cluster

#: Every capability a lattice may declare; each must be declared or denied, explicitly.
ALL_CAPABILITIES = (ISynchronousDispatch, IAcknowledgedPublish, IAddressedDelivery, IClusteredLattice,
                    IExactBroadcastCount, IConnectionState, IStartable, IBoundedPayload)

#: A body bigger than this is "large" for a lattice without a payload bound.
UNBOUNDED_LARGE_BODY = 4 * 1024 * 1024


class Collector:
    """A subscription callback (data) or ``on_status`` callback (statuses) that records
    what it gets; ``wait(n)`` fires once it has ``n`` items."""

    def __init__(self, fail_with=None):
        self.items = []
        self._waiters = []
        self._fail_with = fail_with

    def __call__(self, item):
        self.items.append(item)
        still = []
        for n, d in self._waiters:
            if len(self.items) >= n:
                d.callback(self.items)
            else:
                still.append((n, d))
        self._waiters = still
        if self._fail_with is not None:
            raise self._fail_with

    def wait(self, n: int = 1):
        if len(self.items) >= n:
            return defer.succeed(self.items)
        d = defer.Deferred()
        self._waiters.append((n, d))
        return d

    @property
    def subjects(self):
        return [m.subject for m in self.items]

    @property
    def bodies(self):
        return [m.body for m in self.items]


class LatticeConformanceMixin:
    """The bodies. A subclass sets ``capabilities`` and implements ``make_lattice()``.

    ``self.lattice`` publishes and requests; ``self.peer`` (``make_peer_lattice()``, by
    default the same lattice, or a second instance for a clustered one) subscribes and
    responds, so on a cluster every body crosses instances.
    """

    timeout = 60
    capabilities: frozenset = frozenset()

    def make_lattice(self):
        """Return a new started lattice (or a Deferred firing with one). Called per test,
        possibly more than once; the suite closes each one at cleanup."""
        raise NotImplementedError

    def make_peer_lattice(self):
        """A second instance on the same bus when the lattice is clustered; else itself."""
        if IClusteredLattice.providedBy(self.lattice):
            return self.make_lattice()
        return self.lattice

    @defer.inlineCallbacks
    def new_lattice(self, peer: bool = False):
        lattice = yield (self.make_peer_lattice() if peer else self.make_lattice())
        if lattice is not self.lattice:  # the default peer is the lattice itself
            self.addCleanup(lattice.close)
        return lattice

    @defer.inlineCallbacks
    def setUp(self):
        self.lattice = None
        self.lattice = yield self.new_lattice()
        self.peer = yield self.new_lattice(peer=True)

    # -- helpers (ILattice only) ----------------------------------------------------------

    def unique(self, stem: str) -> str:
        return f"{stem}.{secrets.token_hex(4)}"

    @defer.inlineCallbacks
    def subscribe(self, lattice, pattern, callback=None, queue=None, on_status=None):
        callback = callback if callback is not None else Collector()
        sub = yield lattice.subscribe(pattern, callback, queue=queue, on_status=on_status)
        self.assertTrue(ISubscription.providedBy(sub))
        self.addCleanup(sub.unsubscribe)
        return callback

    def responder(self, lattice, transform=lambda body: body):
        """A callback answering each message's reply subject with ``transform(body)``."""
        def respond(msg):
            if msg.reply_to is not None:
                return lattice.publish(BrokerMessage(msg.reply_to, transform(msg.body)))
        return respond

    @defer.inlineCallbacks
    def settle(self):
        """Wait until interest changes made on ``self.peer`` are seen from ``self.lattice``.

        On a NATS cluster interest travels between nodes asynchronously, in order: once a
        fresh subscription made on the peer answers a request from the lattice, every
        earlier change on the peer's node is known on the lattice's node too.
        """
        subject = self.unique("_settle")
        sub = yield self.peer.subscribe(subject, self.responder(self.peer))
        try:
            for _ in range(200):
                try:
                    yield self.lattice.request(subject, b"", 2000)
                    return
                except (NoResponders, RequestTimeout):
                    continue
            self.fail("the peer's subscriptions never became visible from the lattice")
        finally:
            yield sub.unsubscribe()

    @defer.inlineCallbacks
    def barrier(self, lattice=None, receiver=None):
        """Wait until everything ``lattice`` published so far has reached ``receiver``
        (per-publisher order: a marker published now arrives after all of it)."""
        lattice = lattice or self.lattice
        receiver = receiver or self.peer
        marker = Collector()
        subject = self.unique("_barrier")
        sub = yield receiver.subscribe(subject, marker)
        if receiver is not lattice:
            yield self.settle()
        yield lattice.publish(BrokerMessage(subject, b""))
        yield marker.wait(1)
        yield sub.unsubscribe()

    # -- the declared capabilities -----------------------------------------------------

    def test_declared_capabilities(self):
        """Exactly the capabilities the suite was told about, each complete."""
        verifyObject(ILattice, self.lattice)
        for capability in ALL_CAPABILITIES:
            declared = capability.providedBy(self.lattice)
            self.assertEqual(declared, capability in self.capabilities,
                             f"{capability.__name__}: declared={declared}")
            if declared:
                verifyObject(capability, self.lattice)

    # -- subjects ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_wildcards(self):
        """``*`` matches exactly one token, ``>`` one or more trailing tokens."""
        got = {}
        for pattern in ("a.*", "a.>", "*.b", "a.b", ">"):
            got[pattern] = yield self.subscribe(self.peer, pattern)
        yield self.settle()
        for subject in ("a.b", "a.b.c", "a", "x.b"):
            yield self.lattice.publish(BrokerMessage(subject, b""))
        yield self.barrier()
        self.assertEqual({p: c.subjects for p, c in got.items()}, {
            "a.*": ["a.b"], "a.>": ["a.b", "a.b.c"], "*.b": ["a.b", "x.b"], "a.b": ["a.b"],
            ">": ["a.b", "a.b.c", "a", "x.b"]})

    @defer.inlineCallbacks
    def test_first_token_rule(self):
        """A pattern starting with a wildcard never sees ``_...`` or ``$...`` subjects;
        a pattern naming that first token does."""
        got = {}
        for pattern in (">", "*.x", "*.*", "_ws.>", "$app.>"):
            got[pattern] = yield self.subscribe(self.peer, pattern)
        yield self.settle()
        for subject in ("a.x", "_ws.x", "$app.x"):
            yield self.lattice.publish(BrokerMessage(subject, b""))
        yield self.barrier()
        self.assertEqual({p: c.subjects for p, c in got.items()}, {
            ">": ["a.x"], "*.x": ["a.x"], "*.*": ["a.x"], "_ws.>": ["_ws.x"], "$app.>": ["$app.x"]})

    # -- queue groups ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_queue_groups_deliver_once_per_group(self):
        workers = []
        for _ in range(3):
            workers.append((yield self.subscribe(self.peer, "jobs.*", queue="workers")))
        audit = yield self.subscribe(self.peer, "jobs.*", queue="audit")
        plain = yield self.subscribe(self.peer, "jobs.*")
        yield self.settle()
        sent = [str(i).encode() for i in range(30)]
        for body in sent:
            yield self.lattice.publish(BrokerMessage(f"jobs.{int(body) % 3}", body))
        yield self.barrier()
        self.assertEqual(sorted(b for w in workers for b in w.bodies), sorted(sent))
        self.assertEqual(audit.bodies, sent)
        self.assertEqual(plain.bodies, sent)

    # -- request / reply -------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_request_reply(self):
        yield self.subscribe(self.peer, "svc.upper", self.responder(self.peer, bytes.upper))
        yield self.subscribe(self.peer, "svc.later", lambda m: _later(
            lambda: self.peer.publish(BrokerMessage(m.reply_to, b"later " + m.body))))
        yield self.settle()
        reply = yield self.lattice.request("svc.upper", b"hi", 5000)
        self.assertIsInstance(reply, BrokerMessage)
        self.assertEqual(reply.body, b"HI")
        reply = yield self.lattice.request("svc.later", b"x", 5000)
        self.assertEqual(reply.body, b"later x")

    @defer.inlineCallbacks
    def test_request_reply_subject_is_fresh(self):
        seen = yield self.subscribe(self.peer, "svc.echo", _also(self.responder(self.peer)))
        yield self.settle()
        yield self.lattice.request("svc.echo", b"1", 5000)
        yield self.lattice.request("svc.echo", b"2", 5000)
        first, second = (m.reply_to for m in seen.collected.items)
        self.assertNotEqual(first, second)
        self.assertIn(first[0], "_$", "an inbox is a private subject (first-token rule)")

    @defer.inlineCallbacks
    def test_fail_reply(self):
        """The responder that owed a reply is gone: ``fail_reply`` fails the requester at
        once (on a clustered lattice, also from another instance)."""
        def gone(msg):
            self.assertTrue(self.peer.fail_reply(msg.reply_to, NotConnected("the session went away")))
        yield self.subscribe(self.peer, "svc.leaving", gone)
        yield self.settle()
        error = yield self.assertFailure(self.lattice.request("svc.leaving", b"", 30000), NotConnected)
        self.assertIn("went away", str(error))
        self.assertFalse(self.lattice.fail_reply("not.an.inbox", NotConnected("x")))

    def test_new_inbox(self):
        inboxes = {self.lattice.new_inbox() for _ in range(100)}
        self.assertEqual(len(inboxes), 100)
        self.assertTrue(all(inbox[0] in "_$" for inbox in inboxes), "an inbox is a private subject")

    @defer.inlineCallbacks
    def test_request_timeout(self):
        yield self.subscribe(self.peer, "svc.silent", lambda m: None)
        yield self.settle()
        error = yield self.assertFailure(self.lattice.request("svc.silent", b"", 200), RequestTimeout)
        self.assertEqual(error.code, "timeout")
        self.assertIn("200ms", str(error))

    @defer.inlineCallbacks
    def test_request_no_responders(self):
        """Nobody listening fails the request with ``no_responders``, long before its timeout."""
        error = yield self.assertFailure(self.lattice.request("nobody.home", b"", 30000), NoResponders)
        self.assertEqual(error.code, "no_responders")

    @defer.inlineCallbacks
    def test_request_to_session_address(self):
        """A session's address (and below it) can be requested like any subject."""
        address = self.unique("_ws.session")
        yield self.subscribe(self.peer, address, self.responder(self.peer, lambda b: b"at " + b))
        yield self.subscribe(self.peer, address + ".>", self.responder(self.peer, lambda b: b"below " + b))
        yield self.settle()
        self.assertEqual((yield self.lattice.request(address, b"a", 5000)).body, b"at a")
        self.assertEqual((yield self.lattice.request(address + ".r1", b"b", 5000)).body, b"below b")

    # -- no responders, statuses -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_no_responders_for_a_publish_with_reply_subject(self):
        """A message nobody receives, published with a reply subject at a session address or
        below: reported as ``no_responders``, and never delivered as data.

        With ``IAcknowledgedPublish`` the publish fails; without it (NATS) the bus answers
        the reply subject with a status, which goes to that subscription's ``on_status``.
        """
        address = self.unique("_ws.session")
        for reply_to, pattern in ((address, address), (address + ".r1", address + ".>")):
            statuses = Collector()
            data = yield self.subscribe(self.lattice, pattern, on_status=statuses)
            sent = self.lattice.publish(BrokerMessage("nobody.listens", b"x", reply_to))
            if IAcknowledgedPublish.providedBy(self.lattice):
                error = yield self.assertFailure(sent, NoResponders)
            else:
                yield sent
                error, = yield statuses.wait(1)
            self.assertIsInstance(error, NoResponders)
            self.assertEqual(error.code, "no_responders")
            if not IAcknowledgedPublish.providedBy(self.lattice):
                self.assertIn(repr(reply_to), str(error), "the status names the reply subject it came on")
            yield self.barrier(receiver=self.lattice)
            self.assertEqual(data.items, [], "a bus status was delivered as data")
            self.assertEqual(len(statuses.items), 0 if IAcknowledgedPublish.providedBy(self.lattice) else 1)

    @defer.inlineCallbacks
    def test_status_without_on_status_is_dropped(self):
        """A subscription without ``on_status`` never receives the status as data either."""
        address = self.unique("_ws.session")
        data = yield self.subscribe(self.lattice, address)
        sent = self.lattice.publish(BrokerMessage("nobody.listens", b"x", address))
        if IAcknowledgedPublish.providedBy(self.lattice):
            yield self.assertFailure(sent, NoResponders)
        else:
            yield sent
        yield self.barrier(receiver=self.lattice)
        yield self.lattice.publish(BrokerMessage(address, b"real"))
        yield data.wait(1)
        self.assertEqual(data.bodies, [b"real"])

    @defer.inlineCallbacks
    def test_publish_without_reply_subject_to_nobody(self):
        sent = self.lattice.publish(BrokerMessage("nobody.listens", b"x"))
        if IAcknowledgedPublish.providedBy(self.lattice):
            error = yield self.assertFailure(sent, NoResponders)
            self.assertEqual(error.code, "no_responders")
        else:  # the bus cannot tell: documented as "not an error" (docs/nats.rst)
            self.assertIsNone((yield sent))

    # -- reply routing -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_replies_route_to_session_address_and_below(self):
        address = self.unique("_ws.session")
        at = yield self.subscribe(self.lattice, address)
        below = yield self.subscribe(self.lattice, address + ".>")
        everything = yield self.subscribe(self.lattice, ">")
        yield self.subscribe(self.peer, "svc.echo", self.responder(self.peer))
        yield self.settle()
        yield self.lattice.publish(BrokerMessage("svc.echo", b"one", address))
        yield self.lattice.publish(BrokerMessage("svc.echo", b"two", address + ".r1"))
        yield at.wait(1)
        yield below.wait(1)
        self.assertEqual((at.subjects, at.bodies), ([address], [b"one"]))
        self.assertEqual((below.subjects, below.bodies), ([address + ".r1"], [b"two"]))
        self.assertEqual([s for s in everything.subjects if s[0] in "_$"], [],
                         "'>' must not see session addresses")

    # -- ordering ----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_order_per_publisher(self):
        """One publisher's messages reach a subscription in the order they were published,
        across subjects."""
        got = yield self.subscribe(self.peer, "seq.*")
        yield self.settle()
        sent = []
        for i in range(300):
            body = str(i).encode()
            sent.append(body)
            yield self.lattice.publish(BrokerMessage(f"seq.{'ab'[i % 2]}", body))
        yield got.wait(len(sent))
        self.assertEqual(got.bodies, sent)

    # -- unsubscribe ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_unsubscribe(self):
        first, second = Collector(), Collector()
        sub_first = yield self.peer.subscribe("topic", first)
        sub_second = yield self.peer.subscribe("topic", second)
        self.addCleanup(sub_second.unsubscribe)
        yield self.settle()
        yield self.lattice.publish(BrokerMessage("topic", b"1"))
        yield self.barrier()
        yield sub_first.unsubscribe()
        yield sub_first.unsubscribe()  # idempotent
        yield self.settle()
        yield self.lattice.publish(BrokerMessage("topic", b"2"))
        yield self.barrier()
        self.assertEqual(first.bodies, [b"1"])
        self.assertEqual(second.bodies, [b"1", b"2"])
        yield sub_second.unsubscribe()
        yield self.settle()
        yield self.assertFailure(self.lattice.request("topic", b"", 30000), NoResponders)

    # -- handler errors ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_handler_error(self):
        """A handler's error: the other subscribers still get the message, a requester gets
        the error as the request's failure, a publisher gets it only with
        ``IAcknowledgedPublish``, and the subscription keeps working."""
        refusing = yield self.subscribe(self.peer, "work", Collector(
            fail_with=MessagingError("not today", code="refused")))
        other = yield self.subscribe(self.peer, "work")
        yield self.subscribe(self.peer, "broken", _raises(RuntimeError("handler bug")))
        yield self.subscribe(self.peer, "failing", lambda m: defer.fail(MessagingError("later no", code="refused")))
        yield self.settle()
        sent = self.lattice.publish(BrokerMessage("work", b"1"))
        if IAcknowledgedPublish.providedBy(self.lattice):
            error = yield self.assertFailure(sent, MessagingError)
            self.assertEqual(error.code, "refused")
        else:
            self.assertIsNone((yield sent))
        yield self.barrier()
        self.assertEqual((refusing.bodies, other.bodies), ([b"1"], [b"1"]))

        error = yield self.assertFailure(self.lattice.request("work", b"2", 30000), MessagingError)
        self.assertEqual(error.code, "refused")
        self.assertIn("not today", str(error))
        error = yield self.assertFailure(self.lattice.request("failing", b"", 30000), MessagingError)
        self.assertEqual(error.code, "refused")
        error = yield self.assertFailure(self.lattice.request("broken", b"", 30000), MessagingError)
        self.assertEqual(error.code, "handler_error")
        self.assertIn("handler bug", str(error))
        self.flushLoggedErrors(RuntimeError)  # a handler's bug may be logged with its traceback

        yield self.barrier()
        yield self.lattice.publish(BrokerMessage("work", b"3")).addErrback(lambda f: f.trap(MessagingError))
        yield self.barrier()
        self.assertEqual(refusing.bodies[-1], b"3")
        self.assertEqual(other.bodies[-1], b"3")

    # -- large bodies ----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_large_bodies_up_to_the_limit(self):
        if IBoundedPayload.providedBy(self.lattice):
            size = self.lattice.max_payload - 1024  # headroom for the reply subject
        else:  # documented alternative: no bus limit
            size = UNBOUNDED_LARGE_BODY
        body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        got = yield self.subscribe(self.peer, "big")
        yield self.subscribe(self.peer, "big.echo", self.responder(self.peer))
        yield self.settle()
        yield self.lattice.publish(BrokerMessage("big", body))
        yield got.wait(1)
        self.assertEqual(got.bodies[0], body)
        reply = yield self.lattice.request("big.echo", body, 20000)
        self.assertEqual(reply.body, body)
        if IBoundedPayload.providedBy(self.lattice):
            too_big = b"y" * (self.lattice.max_payload + 1)
            error = yield self.assertFailure(self.lattice.publish(BrokerMessage("big", too_big)), MessagingError)
            self.assertEqual(error.code, "too_large")
            error = yield self.assertFailure(self.lattice.request("big.echo", too_big, 5000), MessagingError)
            self.assertEqual(error.code, "too_large")
            yield self.barrier()
            self.assertEqual(len(got.items), 1, "an oversized body reached a subscriber")

    # -- delivery timing: synchronous dispatch, broadcast counts ---------------------------------

    @defer.inlineCallbacks
    def test_synchronous_dispatch(self):
        got = yield self.subscribe(self.lattice, "sync.now")
        if ISynchronousDispatch.providedBy(self.lattice):
            self.assertIsNone(self.lattice.dispatch(BrokerMessage("sync.now", b"1")))
            self.assertEqual(got.bodies, [b"1"])
            waiting = defer.Deferred()
            yield self.subscribe(self.lattice, "sync.later", lambda m: waiting)
            d = self.lattice.dispatch(BrokerMessage("sync.later", b""))
            self.assertIsInstance(d, defer.Deferred)
            self.assertNoResult(d)
            waiting.callback(None)
            self.assertIsNone(self.successResultOf(d))
        else:  # documented alternative: handlers run after publish returns, on a later turn
            self.assertFalse(ISynchronousDispatch.providedBy(self.lattice))
            yield self.lattice.publish(BrokerMessage("sync.now", b"1"))
            self.assertEqual(got.items, [])
            yield got.wait(1)

    @defer.inlineCallbacks
    def test_exact_broadcast_count(self):
        """With ``IExactBroadcastCount`` every subscriber has run when ``publish`` fires, so the
        sender can count who was reached; without it the count can only be the receivers
        on the sender's own instance (docs/protocol.rst, "Broadcast")."""
        reached = []
        for _ in range(3):
            reached.append((yield self.subscribe(self.lattice, "_ws.broadcast.>")))
        yield self.lattice.publish(BrokerMessage("_ws.broadcast.news", b"x"))
        if IExactBroadcastCount.providedBy(self.lattice):
            self.assertEqual([len(c.items) for c in reached], [1, 1, 1])
        else:
            # Subscribers in this process may have run already (local-first), others not yet.
            self.assertFalse(IExactBroadcastCount.providedBy(self.lattice))
            self.assertTrue(all(len(c.items) <= 1 for c in reached))
            for c in reached:
                yield c.wait(1)

    # -- addressed delivery ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_addressed_delivery(self):
        address = "_ws.session." + secrets.token_hex(6)
        got = yield self.subscribe(self.peer, address)
        yield self.settle()
        if IAddressedDelivery.providedBy(self.lattice):
            done = yield self.lattice.publish_to_address(address, BrokerMessage("note", b"n", "answer.here"), 5000)
            self.assertIsNone(done)
            self.assertEqual([(m.subject, m.body, m.reply_to) for m in got.items], [("note", b"n", "answer.here")])
            yield self.assertFailure(self.lattice.publish_to_address(
                "_ws.session.nobody", BrokerMessage("note", b""), 30000), NoResponders)
            refusing = "_ws.session." + secrets.token_hex(6)
            yield self.subscribe(self.peer, refusing, _raises(NotConnected("the session is closing")))
            yield self.settle()
            error = yield self.assertFailure(self.lattice.publish_to_address(
                refusing, BrokerMessage("note", b""), 30000), NotConnected)
            self.assertIn("closing", str(error))
        else:  # documented alternative: publish to the address; the subject is the address
            self.assertFalse(IAddressedDelivery.providedBy(self.lattice))
            yield self.lattice.publish(BrokerMessage(address, b"n", "answer.here"))
            yield got.wait(1)
            self.assertEqual([(m.subject, m.body, m.reply_to) for m in got.items], [(address, b"n", "answer.here")])

    # -- instances -----------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_clustered(self):
        other = yield self.new_lattice(peer=True)
        yield self.subscribe(other, "across", self.responder(other, lambda b: b"from other"))
        if IClusteredLattice.providedBy(self.lattice):
            self.assertIsNot(other, self.lattice)
            self.peer = other
            yield self.settle()
            reply = yield self.lattice.request("across", b"", 5000)
            self.assertEqual(reply.body, b"from other")
            # One queue group across instances: each message handled once in all.
            here = yield self.subscribe(self.lattice, "shared", queue="g")
            there = yield self.subscribe(other, "shared", queue="g")
            yield self.settle()
            for i in range(20):
                yield self.lattice.publish(BrokerMessage("shared", str(i).encode()))
            yield self.barrier(receiver=other)
            yield self.barrier(receiver=self.lattice)
            self.assertEqual(sorted(here.bodies + there.bodies, key=int), [str(i).encode() for i in range(20)])
        else:  # documented alternative: this instance is the whole lattice
            self.assertFalse(IClusteredLattice.providedBy(self.lattice))
            self.assertIs(other, self.lattice)
            separate = yield self.new_lattice()
            self.assertIsNot(separate, self.lattice)
            yield self.assertFailure(separate.request("across", b"", 30000), NoResponders)
            self.assertEqual((yield self.lattice.request("across", b"", 5000)).body, b"from other")

    @defer.inlineCallbacks
    def test_connection_state(self):
        lattice = yield self.new_lattice()
        if IConnectionState.providedBy(lattice):
            self.assertTrue(lattice.connected)
            changes = []
            lattice.add_state_listener(changes.append)
            removed = []
            lattice.add_state_listener(removed.append)
            lattice.remove_state_listener(removed.append)
            yield lattice.close()
            self.assertFalse(lattice.connected)
            self.assertEqual(changes[-1:], [False])
            self.assertEqual(removed, [])
        else:  # documented alternative: always connected while open
            self.assertFalse(IConnectionState.providedBy(lattice))
            yield lattice.close()

    # -- close -----------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_close_cleans_up(self):
        """``close()`` fails what waits, refuses what comes after, leaves no subscription on the
        bus and no timer in the reactor (trial checks the reactor after every test)."""
        lattice = yield self.new_lattice()
        yield lattice.subscribe("svc.closing", lambda m: None)
        yield lattice.subscribe("svc.closing.>", Collector(), on_status=Collector())
        if IClusteredLattice.providedBy(lattice):  # else it is a bus of its own
            self.peer = lattice
            yield self.settle()
        waiting = lattice.request("svc.closing", b"", 30000)
        yield lattice.close()
        error = yield self.assertFailure(waiting, NotConnected)
        self.assertEqual(error.code, "not_connected")
        yield self.assertFailure(lattice.publish(BrokerMessage("svc.closing", b"")), NotConnected)
        yield self.assertFailure(lattice.request("svc.closing", b"", 1000), NotConnected)
        yield self.assertFailure(defer.maybeDeferred(lattice.subscribe, "x", lambda m: None), NotConnected)
        yield lattice.close()  # idempotent
        # Its subscriptions are gone from the bus: nobody answers on that subject any more.
        for _ in range(200):
            try:
                yield self.lattice.request("svc.closing", b"", 500)
            except NoResponders:
                break
            except RequestTimeout:  # a cluster still routing to the closed connection's node
                continue
        else:
            self.fail("the closed lattice's subscription is still on the bus")


def _later(f):
    d = defer.Deferred()
    reactor.callLater(0, lambda: defer.maybeDeferred(f).chainDeferred(d))
    return d


def _also(callback):
    """Wrap ``callback`` so the messages it gets are recorded in ``.collected``."""
    collected = Collector()

    def both(msg):
        collected(msg)
        return callback(msg)

    both.collected = collected
    return both


def _raises(error):
    def handler(msg):
        raise error
    return handler


# -- the lattices -------------------------------------------------------------------------------


class LocalLatticeConformance(LatticeConformanceMixin, unittest.TestCase):
    """The embedded lattice (one process, synchronous, exact counts)."""

    capabilities = frozenset({ISynchronousDispatch, IExactBroadcastCount, IAcknowledgedPublish})

    def make_lattice(self):
        return LocalLattice(reactor)


NATS_CAPABILITIES = frozenset({IAddressedDelivery, IClusteredLattice, IConnectionState, IStartable,
                               IBoundedPayload})


@defer.inlineCallbacks
def started_nats_lattice(testcase, url, subject_prefix=""):
    client = NatsClient(url, reactor=reactor, name=f"conformance-{testcase.id().rsplit('.', 1)[-1]}")
    lattice = NatsLattice(client, reactor=reactor, subject_prefix=subject_prefix)
    yield lattice.start()
    yield lattice.when_connected()
    return lattice


class NatsExtras:
    """NATS-only facts beside the shared bodies."""

    @defer.inlineCallbacks
    def test_dropped_status_is_counted(self):
        address = self.unique("_ws.session")
        data = yield self.subscribe(self.lattice, address)
        yield self.lattice.publish(BrokerMessage("nobody.listens", b"x", address))
        yield self.barrier(receiver=self.lattice)
        self.assertEqual(self.lattice.statuses_dropped, 1)
        self.assertEqual(data.items, [])


class NatsSingleServerConformance(NatsExtras, LatticeConformanceMixin, unittest.TestCase):
    """``NatsLattice`` on one real nats-server."""

    capabilities = NATS_CAPABILITIES

    @defer.inlineCallbacks
    def make_lattice(self):
        if getattr(self, "server", None) is None:  # one server per test, started on first use
            self.server = NatsServer(self)
            yield self.server.start()
        lattice = yield started_nats_lattice(self, self.server.url)
        return lattice


class NatsClusterConformance(NatsExtras, LatticeConformanceMixin, unittest.TestCase):
    """``NatsLattice`` on a real 3-node nats-server cluster: the lattice on node 0, the peer
    on node 2, with a ``NATS_SUBJECT_PREFIX`` (the prefix must be invisible)."""

    capabilities = NATS_CAPABILITIES

    @defer.inlineCallbacks
    def _servers(self):
        if getattr(self, "servers", None) is None:
            self.servers = yield start_cluster(self, size=3)
        return self.servers

    @defer.inlineCallbacks
    def make_lattice(self):
        servers = yield self._servers()
        lattice = yield started_nats_lattice(self, servers[0].url, subject_prefix="tenant")
        return lattice

    @defer.inlineCallbacks
    def make_peer_lattice(self):
        servers = yield self._servers()
        lattice = yield started_nats_lattice(self, servers[2].url, subject_prefix="tenant")
        return lattice


class Wasmcloud1LatticeConformance(LatticeConformanceMixin, unittest.TestCase):
    """The wasmCloud 1.x lattice's bus, as the provider builds it for one link group (its wRPC
    side, reaching components, is tested in tests/test_wasmcloud1_host.py)."""

    capabilities = frozenset({IConnectionState, IExactBroadcastCount, ISynchronousDispatch, IAcknowledgedPublish})

    def make_lattice(self):
        from .wasmcloud1host import make_wasmcloud1_lattice
        return make_wasmcloud1_lattice(self)
