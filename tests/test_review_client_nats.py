"""Review findings: client-mode links and the NATS client, each shown by a failing test first."""

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.natsserver import start_cluster
from tests.test_nats_client import Collector
from tests.test_nats_reconnect import FAST_RECONNECT, wait_for_state
from wsprovider.nats import State, connect


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
        self.assertEqual({s.port for s in client.pool.servers}, {s.port for s in servers})
        yield servers[0].kill()
        yield wait_for_state(client, State.RECONNECTING)
        yield wait_for_state(client, State.CONNECTED, timeout=10)
        self.assertEqual(client.connected_server.port, servers[1].port)
