"""The HTTP-phase guard (wsprovider.handshake), driven with task.Clock and StringTransport;
test_abuse.py runs the same limits against a live server with dripping sockets."""

from twisted.internet import task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from wsprovider.config import ProviderConfig
from wsprovider.handshake import HandshakeGuard
from wsprovider.session import SessionStats


def transport(host):
    return StringTransport(peerAddress=IPv4Address("TCP", host, 40000))


class HandshakeGuardTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.stats = SessionStats()
        self.sessions = 0
        config = ProviderConfig.from_mapping({"HANDSHAKE_TIMEOUT_SEC": "10", "MAX_PENDING_HANDSHAKES": "8",
                                              "MAX_HANDSHAKES_PER_ADDRESS": "2", "MAX_CONNECTIONS": "10"})
        self.guard = HandshakeGuard(self.clock, config, self.stats, lambda: self.sessions)
        self.expired = []

    def open(self, host):
        t = transport(host)
        return t, self.guard.opened(t, lambda: self.expired.append(t))

    def test_deadline_counts_from_the_connection_not_the_last_byte(self):
        t, admitted = self.open("10.0.0.1")
        self.assertTrue(admitted)
        self.assertEqual(self.stats.handshakes_pending, 1)
        self.clock.advance(9.9)
        self.assertEqual(self.expired, [])
        self.clock.advance(0.2)
        self.assertEqual(self.expired, [t])
        self.assertEqual((self.stats.handshake_timeouts, self.stats.handshakes_pending), (1, 0))

    def test_upgrade_or_close_releases(self):
        t, _ = self.open("10.0.0.1")
        self.guard.upgraded(t)
        self.clock.advance(60)
        self.assertEqual(self.expired, [])
        self.assertEqual(len(self.guard), 0)
        self.guard.done(t)  # twice: harmless

    def test_a_kept_alive_connection_gets_a_new_deadline_per_request(self):
        t, _ = self.open("10.0.0.1")
        self.clock.advance(8)
        self.guard.restart(t, lambda: self.expired.append(t))
        self.clock.advance(8)
        self.assertEqual(self.expired, [])
        self.clock.advance(3)
        self.assertEqual(self.expired, [t])

    def test_per_address_cap_only_under_pressure(self):
        for _ in range(4):  # half of MAX_PENDING_HANDSHAKES: a burst from one address passes
            self.assertTrue(self.open("10.0.0.1")[1])
        t, admitted = self.open("10.0.0.1")
        self.assertFalse(admitted)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"MAX_HANDSHAKES_PER_ADDRESS", t.value())
        self.assertTrue(t.disconnecting)
        self.assertTrue(self.open("10.0.0.2")[1])  # another address still gets in
        self.assertEqual(self.stats.refusals["address_handshakes"], 1)

    def test_total_cap_and_max_connections(self):
        for i in range(8):
            self.assertTrue(self.open(f"10.0.1.{i}")[1])
        t, admitted = self.open("10.0.2.1")
        self.assertFalse(admitted)
        self.assertEqual(self.stats.refusals["pending_handshakes"], 1)
        for t in list(self.guard._pending):
            self.guard.done(t)
        self.sessions = 9  # sessions and waiting connections together stay under MAX_CONNECTIONS
        self.assertTrue(self.open("10.0.3.1")[1])
        self.assertFalse(self.open("10.0.3.2")[1])
        self.assertEqual(self.stats.refusals["max_connections"], 1)
