"""The sans-IO session core, driven synchronously: a ``task.Clock``, the embedded lattice
on that clock, and a memory transport (the only fake: it stands for the WebSocket wire,
which the integration tests in test_server.py and test_abuse.py provide for real)."""

import json

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from wsprovider.config import ProviderConfig
from wsprovider.lattice.local import LocalLattice
from wsprovider.message import BrokerMessage, MessagingError, NoResponders, NotConnected
from wsprovider.session import (CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_SLOW_CONSUMER, CLOSED, OPEN,
                                ISessionTransport, Refused, SessionHub)


@implementer(ISessionTransport)
class MemoryTransport:
    """Records what the session writes; ``close`` ends the session as a prompt peer would."""

    def __init__(self):
        self.frames = []        # decoded JSON data frames
        self.controls = []      # (kind, payload)
        self.closes = []        # (code, reason, grace)
        self.aborted = False
        self.reading = True
        self.session = None
        self.echo_close = True

    def send_payload(self, payload):
        self.frames.append(json.loads(payload))

    def send_prepared(self, prepared):
        self.frames.append(json.loads(prepared))

    def send_control(self, kind, payload):
        self.controls.append((kind, payload))

    def close(self, code, reason, grace=None):
        self.closes.append((code, reason, grace))
        if self.echo_close:
            self.session.closed(code, reason)

    def abort(self):
        self.aborted = True
        self.session.closed(1006, "aborted")

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def of_type(self, kind):
        return [f for f in self.frames if f.get("type") == kind]


class SessionTestsBase(unittest.TestCase):
    settings = {}

    def setUp(self):
        self.clock = task.Clock()
        self.lattice = LocalLattice(self.clock)
        self.config = ProviderConfig.from_mapping(self.settings)
        self.hub = SessionHub(self.lattice, self.config, self.clock, prepare=lambda payload, binary: payload,
                              wall_clock=self.clock.seconds)
        self.hub.start()

    def open(self, **admit):
        transport = MemoryTransport()
        admission = self.hub.admit({}, {}, admit.get("protocols", []))
        session = self.hub.open_session(transport, admission, peer="memory")
        transport.session = session
        return session, transport

    def send(self, session, **frame):
        session.received(json.dumps(frame).encode(), False)


class LifecycleTests(SessionTestsBase):
    def test_transport_interface(self):
        verifyObject(ISessionTransport, MemoryTransport())

    def test_welcome_and_address(self):
        session, t = self.open()
        (welcome,) = t.frames
        self.assertEqual(welcome["type"], "welcome")
        self.assertEqual(welcome["reply_to"], session.address)
        self.assertTrue(self.lattice.has_subscribers(session.address))
        self.assertTrue(self.lattice.has_subscribers(session.address + ".x"))
        self.assertEqual(self.hub.list_sessions()[0]["session_id"], session.session_id)

    def test_close_releases_everything(self):
        session, t = self.open()
        self.send(session, type="subscribe", subject="news", id=1)
        self.assertTrue(self.lattice.has_subscribers("news"))
        session.closed(1000, "bye")
        self.assertEqual(session.state, CLOSED)
        self.assertFalse(self.lattice.has_subscribers("news"))
        self.assertFalse(self.lattice.has_subscribers(session.address))
        self.assertEqual(self.hub.sessions, {})
        self.assertEqual(self.hub.subscription_count, 0)
        self.assertEqual(self.hub.stats.sessions_closed, 1)

    def test_no_frame_after_close(self):
        session, t = self.open()
        t.echo_close = False
        session.close(1000, "bye")
        count = len(t.frames)
        self.send(session, type="ping", id=1)
        self.assertRaises(NotConnected, session.deliver, BrokerMessage("x", b"late"))
        self.assertEqual(len(t.frames), count)

    def test_credentials_expire(self):
        class Identity:
            principal, publish, subscribe = "p", None, None
            expires_at = 30.0

        class Auth:
            def authenticate(self, headers, params):
                return Identity()

        self.hub.authenticator = Auth()
        session, t = self.open()
        self.clock.advance(29)
        self.assertEqual(session.state, OPEN)
        self.clock.advance(2)
        self.assertEqual(t.closes[0][0], CLOSE_POLICY)


class AdmissionTests(SessionTestsBase):
    settings = {"MAX_CONNECTIONS": "1"}

    def test_max_connections_and_release(self):
        admission = self.hub.admit({}, {}, [])
        with self.assertRaises(Refused) as cm:
            self.hub.admit({}, {}, [])
        self.assertEqual((cm.exception.status, cm.exception.kind), (503, "max_connections"))
        self.hub.release(admission)
        self.hub.admit({}, {}, [])
        self.assertEqual(self.hub.stats.refusals["max_connections"], 1)

    def test_unknown_subprotocol(self):
        with self.assertRaises(Refused) as cm:
            self.hub.admit({}, {}, ["nope"])
        self.assertEqual(cm.exception.status, 400)
        self.assertEqual(self.hub.admit({}, {}, ["nope", "wsprovider.v1.msgpack"]).subprotocol,
                         "wsprovider.v1.msgpack")

    def test_a_checker_crash_is_a_counted_401(self):
        class Broken:
            def authenticate(self, headers, params):
                raise TypeError("key type mismatch")

        self.hub.authenticator = Broken()
        with self.assertRaises(Refused) as cm:
            self.hub.admit({}, {}, [])
        self.assertEqual((cm.exception.status, str(cm.exception)), (401, "invalid credentials"))
        self.assertEqual(self.hub.stats.auth_refusals["invalid"], 1)
        self.assertEqual(self.hub.stats.refusals["auth"], 1)

    def test_draining_refuses(self):
        self.hub.draining = True
        with self.assertRaises(Refused) as cm:
            self.hub.admit({}, {}, [])
        self.assertEqual(cm.exception.kind, "draining")


class PublishTests(SessionTestsBase):
    settings = {"PUBLISH_DENY": "svc.>"}

    def test_publish_reaches_handler_with_reply_to(self):
        got = []
        self.lattice.subscribe("app.>", got.append)
        session, t = self.open()
        self.send(session, subject="app.x", body="hi")
        self.assertEqual(got, [BrokerMessage("app.x", b"hi", session.address)])

    def test_no_responders_is_an_error_frame(self):
        session, t = self.open()
        self.send(session, subject="nobody.home", body="hi", id=7)
        (err,) = t.of_type("error")
        self.assertEqual((err["code"], err["id"]), ("no_responders", 7))

    def test_owed_reply_is_one_time(self):
        session, t = self.open()
        self.lattice.subscribe("svc.answer", lambda m: None)
        session.deliver(BrokerMessage("q", b"?", "svc.answer"))
        self.send(session, subject="svc.answer", body="1")
        self.assertEqual(t.of_type("error"), [])
        self.send(session, subject="svc.answer", body="2", id=2)
        self.assertEqual(t.of_type("error")[0]["code"], "permission_denied")

    def test_owed_reply_failed_when_session_leaves(self):
        responder, t = self.open()
        d = self.lattice.request(responder.address, b"?", 5000)
        failures = []
        d.addErrback(failures.append)
        responder.closed(1000, "bye")
        self.assertEqual(failures[0].value.code, "not_connected")

    def test_lone_surrogate_id_is_bad_frame(self):
        session, t = self.open()
        session.received(b'{"subject":"app.x","body":"x","id":"\\ud800"}', False)
        session.received(b'{"subject":"app.\\udc00","body":"x","id":3}', False)
        session.received(b'{"type":"subscribe","subject":"a","queue":"q\\ud800","id":4}', False)
        errors = t.of_type("error")
        self.assertEqual([e["code"] for e in errors], ["bad_frame"] * 3)
        self.assertEqual([e.get("id") for e in errors], [None, 3, 4])
        self.assertEqual(session.state, OPEN)

    def test_bus_status_becomes_an_error_frame(self):
        session, t = self.open()
        session._bus_status(NoResponders("no responders for your message on 'x'"))
        self.assertEqual(t.of_type("error")[0]["code"], "no_responders")


class RequestTests(SessionTestsBase):
    settings = {"MAX_INFLIGHT_REQUESTS": "2"}

    def setUp(self):
        SessionTestsBase.setUp(self)
        self.silent = []
        self.lattice.subscribe("silent", self.silent.append)  # never answers

    def test_cap_is_too_many_requests(self):
        session, t = self.open()
        for i in range(3):
            self.send(session, type="request", subject="silent", id=i)
        errors = t.of_type("error")
        self.assertEqual([(e["code"], e["id"]) for e in errors], [("too_many_requests", 2)])
        self.assertEqual(session.inflight, 2)
        self.assertEqual(self.hub.inflight, 2)

    def test_reply_and_timeout(self):
        session, t = self.open()
        self.send(session, type="request", subject="silent", id="a", timeout_ms=1000)
        self.lattice.publish(BrokerMessage(self.silent[0].reply_to, b"answer"))
        self.assertEqual(t.of_type("reply")[0]["body"], "answer")
        self.send(session, type="request", subject="silent", id="b", timeout_ms=1000)
        self.clock.advance(1.5)
        self.assertEqual(t.of_type("error")[0]["code"], "timeout")
        self.assertEqual(self.hub.inflight, 0)

    def test_session_end_cancels_requests_at_once(self):
        session, t = self.open()
        self.send(session, type="request", subject="silent", id=1)
        self.send(session, type="request", subject="silent", id=2)
        self.assertEqual(len(self.lattice._pending), 2)
        session.closed(1006, "gone")
        self.assertEqual(len(self.lattice._pending), 0)
        self.assertEqual(self.hub.inflight, 0)
        self.assertEqual(self.hub.stats.requests_cancelled, 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_is_not_held_by_an_orphan(self):
        busy, t = self.open()
        t.echo_close = False
        idle, t2 = self.open()
        self.send(busy, type="request", subject="silent", id=1)
        done = self.hub.drain(10)
        self.assertEqual(t2.closes[0][0], CLOSE_GOING_AWAY)
        self.assertFalse(done.called)
        busy.closed(1006, "the peer vanished")
        self.assertTrue(done.called)

    def test_drain_waits_for_an_answer(self):
        busy, t = self.open()
        self.send(busy, type="request", subject="silent", id=1)
        done = self.hub.drain(10)
        self.assertFalse(done.called)
        self.lattice.publish(BrokerMessage(self.silent[0].reply_to, b"ok"))
        self.assertTrue(done.called)
        self.assertEqual(t.of_type("reply")[0]["body"], "ok")


class SubscriptionTests(SessionTestsBase):
    settings = {"MAX_TOTAL_SUBSCRIPTIONS": "3", "MAX_SUBSCRIPTIONS": "2"}

    def test_resubscribe_with_another_queue_is_an_error(self):
        session, t = self.open()
        self.send(session, type="subscribe", subject="jobs", queue="workers", id=1)
        self.send(session, type="subscribe", subject="jobs", queue="workers", id=2)
        self.send(session, type="subscribe", subject="jobs", id=3)
        self.send(session, type="subscribe", subject="jobs", queue="other", id=4)
        self.assertEqual([f["id"] for f in t.of_type("subscribed")], [1, 2])
        self.assertEqual([(e["code"], e["id"]) for e in t.of_type("error")],
                         [("already_subscribed", 3), ("already_subscribed", 4)])

    def test_per_session_and_service_wide_caps(self):
        a, ta = self.open()
        b, tb = self.open()
        for i, subject in enumerate(("a.*", "b.*", "c.*")):
            self.send(a, type="subscribe", subject=subject, id=i)
        self.assertEqual(ta.of_type("error")[0]["code"], "too_many_subscriptions")
        self.send(b, type="subscribe", subject="d.*", id=1)
        self.send(b, type="subscribe", subject="e.*", id=2)
        (err,) = tb.of_type("error")
        self.assertIn("MAX_TOTAL_SUBSCRIPTIONS", err["message"])
        self.send(a, type="unsubscribe", subject="a.*", id=9)
        self.send(b, type="subscribe", subject="e.*", id=3)
        self.assertEqual([f["id"] for f in tb.of_type("subscribed")], [1, 3])

    def test_queue_names_are_checked(self):
        session, t = self.open()
        self.send(session, type="subscribe", subject="jobs", queue="a\tb", id=1)
        self.assertEqual(t.of_type("error")[0]["code"], "bad_frame")
        self.assertRaises(ValueError, self.lattice.subscribe, "jobs", lambda m: None, "a b")


class OutboundBudgetTests(SessionTestsBase):
    settings = {"OUTBOUND_BUFFER_BYTES": "2048", "SLOW_CONSUMER_GRACE_SEC": "3"}

    def test_queue_while_paused_then_flush_in_order(self):
        session, t = self.open()
        session.transport_paused()
        session.deliver(BrokerMessage("a", b"1"))
        session.pinged(b"p")
        session.deliver(BrokerMessage("a", b"2"))
        self.assertEqual(len(t.frames), 1)  # the welcome
        session.transport_resumed()
        self.assertEqual([f["body"] for f in t.frames[1:]], ["1", "2"])
        self.assertEqual(t.controls, [("pong", b"p")])

    def test_slow_consumer_gets_4008_then_abort_after_grace(self):
        session, t = self.open()
        t.echo_close = False
        session.transport_paused()
        with self.assertRaises(NotConnected):
            for _ in range(100):
                session.deliver(BrokerMessage("a", b"x" * 200))
        self.assertEqual(t.closes, [(CLOSE_SLOW_CONSUMER, "slow consumer: more than 2048 bytes waiting", 3.0)])
        self.assertEqual(self.hub.stats.slow_consumer_closes, 1)
        self.clock.advance(2.9)
        self.assertFalse(t.aborted)
        self.clock.advance(0.2)
        self.assertTrue(t.aborted)
        self.assertEqual(self.hub.stats.sessions_closed, 1)

    def test_pongs_count_a_peer_that_never_reads_is_closed(self):
        session, t = self.open()
        session.transport_paused()
        for _ in range(100):
            session.pinged(b"x" * 100)
        self.assertEqual(t.controls, [])
        self.assertEqual(t.closes[0][0], CLOSE_SLOW_CONSUMER)


class RateLimitTests(SessionTestsBase):
    settings = {"RATE_LIMIT_MSGS_PER_SEC": "5", "RATE_LIMIT_MAX_VIOLATIONS": "3"}

    def test_pings_count_against_the_rate_limit(self):
        session, t = self.open()
        for _ in range(5):
            session.pinged(b"")
        self.assertEqual(len(t.controls), 5)
        session.pinged(b"")
        self.assertEqual(len(t.controls), 5)
        self.assertEqual(self.hub.stats.rate_limited, 1)
        session.pinged(b"")
        session.pinged(b"")
        self.assertEqual(t.closes[0][0], CLOSE_POLICY)

    def test_refill_with_the_clock(self):
        session, t = self.open()
        for _ in range(6):
            self.send(session, type="ping", id=1)
        self.assertEqual(t.of_type("error")[0]["code"], "rate_limited")
        self.clock.advance(1)
        self.send(session, type="ping", id=2)
        self.assertEqual(t.of_type("pong")[-1]["id"], 2)


class BroadcastTests(SessionTestsBase):
    def test_count_is_this_broadcasts(self):
        a, ta = self.open()
        b, tb = self.open()
        counts = []
        self.hub.broadcast(BrokerMessage("news", b"one")).addCallback(counts.append)
        b.closed(1000, "bye")
        self.hub.broadcast(BrokerMessage("news", b"two")).addCallback(counts.append)
        self.assertEqual(counts, [2, 1])
        self.assertEqual([f["body"] for f in ta.of_type("message")], ["one", "two"])

    def test_a_broadcast_that_does_not_come_back_counts_zero(self):
        class NoEcho(LocalLattice):
            def publish(self, msg):
                return defer.succeed(None)

        self.hub.lattice = NoEcho(self.clock)
        counts = []
        self.hub.broadcast(BrokerMessage("news", b"x")).addCallback(counts.append)
        self.assertEqual(counts, [])
        self.clock.advance(self.config.request_timeout_ms / 1000.0)
        self.assertEqual(counts, [0])
        self.assertEqual(self.hub._broadcast_waiters, {})

    def test_targeted_send(self):
        a, ta = self.open()
        self.hub.send_to_session(a.session_id, BrokerMessage("direct", b"hi"))
        self.assertEqual(ta.of_type("message")[0]["body"], "hi")
        failures = []
        self.hub.send_to_session("nobody", BrokerMessage("direct", b"hi")).addErrback(failures.append)
        self.assertIsInstance(failures[0].value, MessagingError)
        self.assertEqual(failures[0].value.code, "not_connected")


class CoreImportsTests(unittest.TestCase):
    def test_no_network_code(self):
        import ast
        import inspect

        import wsprovider.session as module
        tree = ast.parse(inspect.getsource(module))
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        self.assertFalse([n for n in names if n.startswith("autobahn") or n.startswith("twisted.web")], names)
