"""NatsClient against a real nats-server: messaging, headers, requests, limits, drain."""

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.natsserver import NatsServer
from wsprovider.nats import (
    BufferFullError, ConnectionClosedError, MaxPayloadError, NatsClient, NatsTimeoutError,
    NoRespondersError, SlowConsumerError, State, connect,
)


class Collector:
    """A subscription callback that records messages and fires when it has ``count``."""

    def __init__(self, count=1):
        self.messages = []
        self.count = count
        self.done = defer.Deferred()

    def __call__(self, msg):
        self.messages.append(msg)
        if len(self.messages) == self.count and not self.done.called:
            self.done.callback(self.messages)

    def wait(self, timeout=5):
        return self.done.addTimeout(timeout, reactor)


class ServerTestCase(unittest.TestCase):
    timeout = 30
    server_config = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.server = NatsServer(self, config=self.server_config)
        yield self.server.start()

    @defer.inlineCallbacks
    def client(self, **options):
        options.setdefault("name", self.id().rsplit(".", 1)[-1])
        client = yield connect(self.server.url, **options)
        self.addCleanup(client.close)
        return client


class MessagingTests(ServerTestCase):

    @defer.inlineCallbacks
    def test_publish_subscribe(self):
        client = yield self.client()
        collector = Collector(3)
        yield client.subscribe("greetings", collector)
        for index in range(3):
            yield client.publish("greetings", b"hello %d" % index)
        messages = yield collector.wait()
        self.assertEqual([m.data for m in messages], [b"hello 0", b"hello 1", b"hello 2"])
        self.assertEqual(messages[0].subject, "greetings")
        self.assertIsNone(messages[0].headers)
        self.assertIsNone(messages[0].reply)

    @defer.inlineCallbacks
    def test_empty_and_binary_payloads(self):
        client = yield self.client()
        payloads = [b"", b"\r\n", b"MSG x 1 2\r\n", bytes(range(256)) * 300]
        collector = Collector(len(payloads))
        yield client.subscribe("binary", collector)
        for payload in payloads:
            client.publish("binary", payload)
        messages = yield collector.wait()
        self.assertEqual([m.data for m in messages], payloads)

    @defer.inlineCallbacks
    def test_wildcards(self):
        client = yield self.client()
        single, full = Collector(2), Collector(3)
        yield client.subscribe("orders.*", single)
        yield client.subscribe("orders.>", full)
        for subject in ("orders.new", "orders.paid", "orders.eu.new"):
            client.publish(subject, subject.encode())
        yield full.wait()
        yield client.flush()
        self.assertEqual(sorted(m.subject for m in single.messages), ["orders.new", "orders.paid"])
        self.assertEqual(len(full.messages), 3)

    @defer.inlineCallbacks
    def test_queue_group_delivers_each_message_once(self):
        client = yield self.client()
        first, second = Collector(), Collector()
        yield client.subscribe("work", first, queue="workers")
        yield client.subscribe("work", second, queue="workers")
        for index in range(20):
            client.publish("work", b"%d" % index)
        yield client.flush()
        yield client.flush()
        received = sorted(int(m.data) for m in first.messages + second.messages)
        self.assertEqual(received, list(range(20)))

    @defer.inlineCallbacks
    def test_headers_round_trip_with_repeated_names(self):
        client = yield self.client()
        collector = Collector()
        yield client.subscribe("with.headers", collector)
        yield client.publish("with.headers", b"body",
                             headers={"Trace-Id": "abc", "Accept": ["a/b", "c/d"]})
        [msg] = yield collector.wait()
        self.assertEqual(msg.data, b"body")
        self.assertEqual(msg.headers, {"Trace-Id": "abc", "Accept": "a/b, c/d"})
        self.assertEqual(msg.get_all("Accept"), ["a/b", "c/d"])

    @defer.inlineCallbacks
    def test_unsubscribe_after_max_msgs(self):
        client = yield self.client()
        collector = Collector()
        sub = yield client.subscribe("limited", collector)
        yield sub.unsubscribe(max_msgs=2)
        for index in range(5):
            client.publish("limited", b"%d" % index)
        yield client.flush()
        self.assertEqual([m.data for m in collector.messages], [b"0", b"1"])
        self.assertTrue(sub.closed)

    @defer.inlineCallbacks
    def test_unsubscribe_stops_delivery(self):
        client = yield self.client()
        collector = Collector()
        sub = yield client.subscribe("stop", collector)
        yield sub.unsubscribe()
        client.publish("stop", b"ignored")
        yield client.flush()
        self.assertEqual(collector.messages, [])

    @defer.inlineCallbacks
    def test_invalid_subject_is_refused(self):
        client = yield self.client()
        yield self.assertFailure(client.publish("bad subject", b""), ValueError)
        yield self.assertFailure(client.subscribe("bad\r\n", lambda m: None), ValueError)

    @defer.inlineCallbacks
    def test_callback_errors_do_not_break_the_connection(self):
        client = yield self.client()
        collector = Collector(2)

        def fragile(msg):
            collector(msg)
            raise RuntimeError("boom")

        yield client.subscribe("fragile", fragile)
        client.publish("fragile", b"1")
        client.publish("fragile", b"2")
        yield collector.wait()
        yield client.flush()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertTrue(client.is_connected)

    @defer.inlineCallbacks
    def test_server_error_is_reported_with_its_text(self):
        client = yield self.client()
        errors = []
        client.on_error(errors.append)
        # A subject with an empty token is rejected by the server; bypass our own checks.
        client._protocol.send(b"SUB foo..bar 99\r\n")
        yield client.flush()
        self.assertTrue(any("Invalid Subject" in str(e) for e in errors), errors)


class MaxPayloadTests(ServerTestCase):
    server_config = "max_payload: 1024"

    @defer.inlineCallbacks
    def test_max_payload_enforced_before_sending(self):
        client = yield self.client()
        self.assertEqual(client.max_payload, 1024)
        error = yield self.assertFailure(client.publish("big", b"x" * 1025), MaxPayloadError)
        self.assertIn("max_payload of 1024", str(error))
        yield client.publish("big", b"x" * 1024)
        yield client.flush()


class RequestTests(ServerTestCase):

    @defer.inlineCallbacks
    def test_request_reply(self):
        responder = yield self.client(name="responder")
        yield responder.subscribe(
            "echo", lambda msg: msg.respond(msg.data.upper(), headers={"Seen": "yes"}))
        requester = yield self.client()
        replies = yield defer.gatherResults(
            [requester.request("echo", b"ping %d" % i, timeout=5) for i in range(10)])
        self.assertEqual([r.data for r in replies], [b"PING %d" % i for i in range(10)])
        self.assertEqual(replies[0].headers, {"Seen": "yes"})
        # All requests share one inbox subscription.
        self.assertEqual(sum(1 for s in requester._subs.values()
                             if s.subject.startswith("_INBOX.")), 1)

    @defer.inlineCallbacks
    def test_request_with_headers_and_deferred_responder(self):
        responder = yield self.client(name="responder")

        def later(msg):
            d = defer.Deferred()
            reactor.callLater(0, lambda: d.callback(msg.respond(msg.headers["Q"].encode())))
            return d

        yield responder.subscribe("later", later)
        requester = yield self.client()
        reply = yield requester.request("later", b"", timeout=5, headers={"Q": "question"})
        self.assertEqual(reply.data, b"question")

    @defer.inlineCallbacks
    def test_no_responders(self):
        client = yield self.client()
        error = yield self.assertFailure(client.request("nobody.home", b"?", timeout=5),
                                         NoRespondersError)
        self.assertIn("nobody.home", str(error))

    @defer.inlineCallbacks
    def test_request_timeout(self):
        client = yield self.client()
        yield client.subscribe("silent", lambda msg: None)
        yield self.assertFailure(client.request("silent", b"?", timeout=0.2), NatsTimeoutError)
        self.assertEqual(len(client._requests), 0)

    @defer.inlineCallbacks
    def test_cancelled_request_is_forgotten(self):
        client = yield self.client()
        yield client.subscribe("silent", lambda msg: None)
        pending = client.request("silent", b"?", timeout=5)
        pending.cancel()
        yield self.assertFailure(pending, defer.CancelledError)
        self.assertEqual(len(client._requests), 0)


class FlowControlTests(ServerTestCase):

    @defer.inlineCallbacks
    def test_slow_consumer_drops_are_counted(self):
        client = yield self.client()
        errors = []
        client.on_error(errors.append)
        gates = []

        def slow(msg):
            gates.append(defer.Deferred())
            return gates[-1]

        sub = yield client.subscribe("slow", slow, pending_msgs_limit=3)
        for index in range(10):
            client.publish("slow", b"%d" % index)
        yield client.flush()
        self.assertEqual((sub.received, sub.pending_msgs, sub.dropped), (10, 3, 7))
        self.assertIsInstance(errors[0], SlowConsumerError)
        for gate in gates:
            gate.callback(None)
        self.assertEqual(sub.pending_msgs, 0)
        client.publish("slow", b"after")
        yield client.flush()
        self.assertEqual(sub.pending_msgs, 1)
        gates[-1].callback(None)

    @defer.inlineCallbacks
    def test_drain_waits_for_in_flight_callbacks_and_closes(self):
        client = yield self.client()
        observer = yield self.client(name="observer")
        seen = Collector()
        yield observer.subscribe("drained.done", seen)
        gate = defer.Deferred()
        yield client.subscribe("drained", lambda msg: gate)
        observer.publish("drained", b"x")
        yield observer.flush()
        yield client.flush()
        draining = client.drain()
        self.assertEqual(client.state, State.DRAINING)
        client.publish("drained.done", b"published while draining")
        self.assertFalse(draining.called)
        gate.callback(None)
        yield draining
        self.assertEqual(client.state, State.CLOSED)
        [msg] = yield seen.wait()
        self.assertEqual(msg.data, b"published while draining")

    @defer.inlineCallbacks
    def test_close_fails_pending_requests_and_later_calls(self):
        client = yield self.client()
        yield client.subscribe("silent", lambda msg: None)
        pending = client.request("silent", b"?", timeout=5)
        yield client.close()
        yield self.assertFailure(pending, ConnectionClosedError)
        yield self.assertFailure(client.publish("x", b""), ConnectionClosedError)
        yield self.assertFailure(client.flush(), ConnectionClosedError)

    @defer.inlineCallbacks
    def test_flush_timeout(self):
        client = NatsClient("nats://127.0.0.1:1", reconnect_max_delay=0.05)
        client.start().addErrback(lambda f: None)
        self.addCleanup(client.close)
        yield self.assertFailure(client.flush(timeout=0.1), NatsTimeoutError)

    @defer.inlineCallbacks
    def test_buffer_bound_while_disconnected(self):
        client = NatsClient("nats://127.0.0.1:1", pending_buffer_bytes=100,
                            reconnect_max_delay=0.05)
        client.start().addErrback(lambda f: None)
        self.addCleanup(client.close)
        yield client.publish("a", b"x" * 50)
        error = yield self.assertFailure(client.publish("a", b"x" * 50), BufferFullError)
        self.assertIn("reconnect buffer is full", str(error))

    @defer.inlineCallbacks
    def test_gives_up_after_max_reconnect_attempts(self):
        client = NatsClient("nats://127.0.0.1:1", max_reconnect_attempts=2,
                            reconnect_max_delay=0.01)
        states = []
        client.on_state_change(lambda old, new: states.append(new))
        yield self.assertFailure(client.start(), Exception)
        self.assertEqual(states, [State.CLOSED])


class ServiceTests(ServerTestCase):

    @defer.inlineCallbacks
    def test_client_is_a_service(self):
        client = NatsClient(self.server.url)
        client.startService()
        yield client.when_connected()
        self.assertTrue(client.running)
        yield client.stopService()
        self.assertEqual(client.state, State.CLOSED)


class NatsServerHelperTests(unittest.TestCase):
    timeout = 10

    def test_missing_nats_server_fails_with_the_fix(self):
        import tests.natsserver as helper
        self.patch(helper, "find_nats_server", lambda: None)
        server = helper.NatsServer(self)
        error = self.assertRaises(self.failureException, server.start)
        self.assertIn("pip install '.[test]'", str(error))
