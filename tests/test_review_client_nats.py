"""Review findings: client-mode links and the NATS client, each shown by a failing test first."""

import gc
import signal

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from tests.natsserver import NatsServer, start_cluster
from tests.test_nats_client import Collector
from tests.test_nats_reconnect import FAST_RECONNECT, wait_for_servers, wait_for_state
from wsprovider.nats import ConnectionClosedError, NatsClient, StaleConnectionError, State, connect
from wsprovider.nats import client as nats_client_module


class UrlCredentialsFailoverTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_learned_servers_use_the_credentials_of_the_configured_url(self):
        # Credentials given in the URL must also be used for the cluster nodes learned from
        # INFO's connect_urls, or failover to them is refused (Authorization Violation).
        servers = yield start_cluster(
            self, size=2, config='authorization { user: "alice", password: "s3cret" }\n')
        url = f"nats://alice:s3cret@127.0.0.1:{servers[0].port}"
        client = yield connect(url, name="roamer", randomize_servers=False, **FAST_RECONNECT)
        self.addCleanup(client.close)
        yield wait_for_servers(client, [s.port for s in servers])
        self.assertEqual({s.port for s in client.pool.servers}, {s.port for s in servers})
        yield servers[0].kill()
        yield wait_for_state(client, State.RECONNECTING)
        yield wait_for_state(client, State.CONNECTED, timeout=10)
        self.assertEqual(client.connected_server.port, servers[1].port)


class _FlappingNatsServer(protocol.Protocol):
    """Completes the NATS handshake (INFO, PONG to the first PING), then hangs up at once."""

    def connectionMade(self):
        self.factory.connections += 1
        self.transport.write(b'INFO {"server_id":"flap","max_payload":1048576,"headers":true}\r\n')

    def dataReceived(self, data):
        if b"PING\r\n" in data:
            self.transport.write(b"PONG\r\n")
            self.transport.loseConnection()


class ReconnectStormTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_connections_dropped_right_after_the_handshake_back_off(self):
        # A server that accepts CONNECT and then drops the connection every time must not be
        # hammered every few milliseconds forever: the backoff has to grow between such drops.
        factory = protocol.Factory.forProtocol(_FlappingNatsServer)
        factory.connections = 0
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        delays = []
        real = nats_client_module.full_jitter_delay

        def envelope(failures, base, cap, rng=None):
            delays.append(real(failures, base, cap, _Ceiling()))
            return delays[-1]

        self.patch(nats_client_module, "full_jitter_delay", envelope)
        client = NatsClient(f"nats://127.0.0.1:{port.getHost().port}", reconnect_base_delay=0.001,
                            reconnect_max_delay=0.064, connect_timeout=2)
        self.addCleanup(client.close)
        connected = []
        client.on_state_change(lambda old, new: connected.append(new) if new is State.CONNECTED else None)
        client.start()
        done = defer.Deferred()

        def check(old, new):
            if len(connected) >= 8 and not done.called:
                done.callback(None)

        client.on_state_change(check)
        yield done.addTimeout(20, reactor)
        self.assertGreaterEqual(factory.connections, 8)
        # Seven drops in a row after a few ms each: the envelope must have grown to its cap.
        self.assertEqual(max(delays), 0.064, delays)


class _Ceiling:
    """An rng whose uniform(a, b) is b: the top of the full-jitter envelope."""

    def uniform(self, low, high):
        return high


class _SilentServer(protocol.Protocol):
    """Accepts TCP and never says anything (no INFO)."""

    def connectionMade(self):
        self.factory.connected.callback(None)


class ServiceLifecycleTests(unittest.TestCase):
    timeout = 15

    @defer.inlineCallbacks
    def test_stop_service_before_the_first_connection_logs_no_unhandled_error(self):
        # startService() starts connecting and drops start()'s Deferred: stopping the
        # service before the first connection must not leave an unhandled ConnectionClosedError.
        factory = protocol.Factory.forProtocol(_SilentServer)
        factory.connected = defer.Deferred()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = NatsClient(f"nats://127.0.0.1:{port.getHost().port}", connect_timeout=5)
        client.startService()
        yield factory.connected
        yield client.stopService()
        self.assertEqual(client.state, State.CLOSED)
        gc.collect()  # an unhandled failure is logged when its Deferred is collected
        self.assertEqual(self.flushLoggedErrors(ConnectionClosedError), [])


class InFlightPublishTests(unittest.TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_publish_not_yet_written_when_the_connection_is_dropped_is_sent_after_reconnect(self):
        # publish() succeeded ("handed to the connection"), but the connection was dropped
        # before the write went out (here: the stale-connection check, in the same turn).
        # Nothing reached the socket, so the message must go out after the reconnect rather
        # than vanish silently.
        server = NatsServer(self)
        yield server.start()
        client = yield connect(server.url, ping_interval=0.05, max_outstanding_pings=1,
                               **FAST_RECONNECT)
        self.addCleanup(client.close)
        watcher = yield connect(server.url)
        self.addCleanup(watcher.close)
        collector = Collector()
        yield watcher.subscribe("inflight", collector)
        yield watcher.flush()
        published = []

        def on_error(error):
            if isinstance(error, StaleConnectionError) and not published:
                published.append(client.publish("inflight", b"queued as the connection dies"))

        client.on_error(on_error)
        server.process.signalProcess(signal.SIGSTOP)
        try:
            yield wait_for_state(client, State.RECONNECTING)
        finally:
            server.process.signalProcess(signal.SIGCONT)
        self.assertTrue(published[0].called)
        self.assertIsNone(published[0].result)
        yield wait_for_state(client, State.CONNECTED)
        [msg] = yield collector.wait(timeout=10)
        self.assertEqual(msg.data, b"queued as the connection dies")
