"""Resilience: server restarts, first connect while down, cluster failover, backoff."""

import random
import signal

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.natsserver import NatsServer, start_cluster
from tests.test_nats_client import Collector
from wsprovider.nats import NatsClient, StaleConnectionError, State, connect
from wsprovider.nats.client import full_jitter_delay

FAST_RECONNECT = dict(reconnect_base_delay=0.02, reconnect_max_delay=0.2, connect_timeout=2)


def wait_for_state(client, state, timeout=10):
    """Fires when ``client`` enters ``state`` (at once if it is already there)."""
    if client.state is state:
        return defer.succeed(None)
    entered = defer.Deferred()

    def listener(old, new):
        if new is state and not entered.called:
            remove()
            entered.callback(None)

    remove = client.on_state_change(listener)
    return entered.addTimeout(timeout, reactor)


def wait_for_servers(client, ports, timeout=10):
    """Fires once ``client``'s pool holds a server on each of ``ports``.

    A node names the other nodes in its INFO ``connect_urls`` only once the cluster's gossip
    has reached it, which can be after the route is up and after the client's first INFO; it
    then sends an updated INFO, and the client logs each server it learns from it. Waiting
    on that log event (not on time) is what makes a test of failover to learned nodes exact.
    """
    def known():
        return set(ports) <= {server.port for server in client.pool.servers}

    if known():
        return defer.succeed(None)
    learned = defer.Deferred()

    def observer(event):
        if (event.get("log_format", "").startswith("NATS learned server") and known()
                and not learned.called):
            learned.callback(None)

    globalLogPublisher.addObserver(observer)

    def done(result):
        globalLogPublisher.removeObserver(observer)
        return result

    return learned.addTimeout(timeout, reactor).addBoth(done)


class RestartTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_subscriptions_resume_and_buffered_publishes_arrive(self):
        server = NatsServer(self)
        yield server.start()
        client = yield connect(server.url, name="survivor", **FAST_RECONNECT)
        self.addCleanup(client.close)
        states = []
        client.on_state_change(lambda old, new: states.append(new.value))
        collector = Collector(6)
        yield client.subscribe("resume", collector)
        limited = Collector()
        limited_sub = yield client.subscribe("limited", limited, max_msgs=3)
        client.publish("limited", b"before")
        yield client.flush()

        yield server.kill()
        yield wait_for_state(client, State.RECONNECTING)
        for index in range(3):
            client.publish("resume", b"buffered %d" % index)
        yield server.start()
        yield wait_for_state(client, State.CONNECTED)

        other = yield connect(server.url, name="other")
        self.addCleanup(other.close)
        for index in range(3):
            other.publish("resume", b"after %d" % index)
        for index in range(5):
            other.publish("limited", b"after %d" % index)
        yield other.flush()
        messages = yield collector.wait()
        self.assertEqual([m.data for m in messages],
                         [b"buffered 0", b"buffered 1", b"buffered 2",
                          b"after 0", b"after 1", b"after 2"])
        yield client.flush()
        # max_msgs=3 counts across the outage: one before, two after.
        self.assertEqual([m.data for m in limited.messages], [b"before", b"after 0", b"after 1"])
        self.assertTrue(limited_sub.closed)
        self.assertEqual(states, ["reconnecting", "connected"])

    @defer.inlineCallbacks
    def test_first_connect_while_server_is_down(self):
        server = NatsServer(self)
        client = NatsClient(server.url, name="early", **FAST_RECONNECT)
        self.addCleanup(client.close)
        first_connected = client.start()
        collector = Collector()
        subscribed = yield client.subscribe("early", collector)
        client.publish("early", b"sent before the server existed")
        self.assertEqual(client.state, State.CONNECTING)
        self.assertFalse(first_connected.called)
        yield server.start()
        connected = yield first_connected
        self.assertIs(connected, client)
        [msg] = yield collector.wait()
        self.assertEqual(msg.data, b"sent before the server existed")
        self.assertEqual(subscribed.received, 1)

    @defer.inlineCallbacks
    def test_requests_made_while_disconnected_are_answered_after_reconnect(self):
        server = NatsServer(self)
        yield server.start()
        client = yield connect(server.url, **FAST_RECONNECT)
        self.addCleanup(client.close)
        yield client.subscribe("echo", lambda msg: msg.respond(msg.data))
        yield server.kill()
        yield wait_for_state(client, State.RECONNECTING)
        pending = client.request("echo", b"patience", timeout=10)
        yield server.start()
        reply = yield pending
        self.assertEqual(reply.data, b"patience")


class ClusterTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_learns_cluster_urls_and_fails_over(self):
        servers = yield start_cluster(self, size=3)
        client = yield connect(servers[0].url, name="roamer", **FAST_RECONNECT)
        self.addCleanup(client.close)
        collector = Collector(2)
        yield client.subscribe("roam", collector)
        yield wait_for_servers(client, [server.port for server in servers])
        known = {server.port for server in client.pool.servers}
        self.assertEqual(known, {server.port for server in servers})

        yield servers[0].kill()
        yield wait_for_state(client, State.RECONNECTING)
        yield wait_for_state(client, State.CONNECTED)
        self.assertNotEqual(client.connected_server.port, servers[0].port)
        client.publish("roam", b"via a new node")
        other = yield connect(servers[2].url)
        self.addCleanup(other.close)
        # Interest crosses routes asynchronously: publish from node 2 (round trip by round
        # trip, no sleeping) until the resubscribed interest has reached it.
        while not any(m.data == b"from node 2" for m in collector.messages):
            other.publish("roam", b"from node 2")
            yield other.flush()
            yield client.flush()
        self.assertEqual(collector.messages[0].data, b"via a new node")


class BackoffTests(unittest.TestCase):
    timeout = 10

    def test_full_jitter_stays_within_the_exponential_envelope(self):
        rng = random.Random(4)
        for failures in range(12):
            envelope = min(2.0, 0.05 * 2 ** failures)
            delays = [full_jitter_delay(failures, 0.05, 2.0, rng) for _ in range(200)]
            self.assertTrue(all(0 <= delay <= envelope for delay in delays))
            self.assertGreater(max(delays), envelope * 0.8)
            self.assertLess(min(delays), envelope * 0.2)


class StaleConnectionTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_unanswered_pings_drop_the_connection_and_reconnect(self):
        server = NatsServer(self)
        yield server.start()
        client = yield connect(server.url, ping_interval=0.05, max_outstanding_pings=2,
                               **FAST_RECONNECT)
        self.addCleanup(client.close)
        errors = []
        client.on_error(errors.append)
        server.process.signalProcess(signal.SIGSTOP)  # frozen: TCP stays up, nothing answers
        try:
            yield wait_for_state(client, State.RECONNECTING)
        finally:
            server.process.signalProcess(signal.SIGCONT)
        yield wait_for_state(client, State.CONNECTED)
        self.assertIsInstance(errors[0], StaleConnectionError)

    @defer.inlineCallbacks
    def test_close_while_reconnecting_to_a_frozen_server_leaves_nothing_behind(self):
        server = NatsServer(self)
        yield server.start()
        client = yield connect(server.url, ping_interval=0.05, max_outstanding_pings=1,
                               **FAST_RECONNECT)
        server.process.signalProcess(signal.SIGSTOP)
        self.addCleanup(server.process.signalProcess, signal.SIGCONT)
        yield wait_for_state(client, State.RECONNECTING)
        yield client.close()
        self.assertEqual(client.state, State.CLOSED)
