"""Each attack of issue 10 against a live server, with raw sockets and bounded counts.

Every test asserts that the bound holds (a count, a queue, a close code) and that a
bystander session keeps flowing meanwhile. Nothing here measures time: the counts are
small enough for CI; ``bench/slowloris.py`` runs the full-size slowloris by hand.
"""

import json

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest
from zope.interface import implementer

from wsprovider import IMessageHandler
from wsprovider.handlers import echo

from .peers import start_provider
from .test_fastframes import RawPeer, frame


class Dripper(protocol.Protocol):
    """Sends an HTTP upgrade request one byte per ``interval`` seconds, never finishing it."""

    request = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Version: 13\r\nX-Padding: " + b"a" * 4096)

    def __init__(self, interval):
        self.interval = interval
        self.received = b""
        self.lost = defer.Deferred()
        self._sent = 0
        self._loop = None

    def connectionMade(self):
        self._loop = task.LoopingCall(self._drip)
        self._loop.start(self.interval)

    def _drip(self):
        if self._sent < len(self.request):
            self.transport.write(self.request[self._sent:self._sent + 1])
            self._sent += 1

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.lost.callback(self.received)


@implementer(IMessageHandler)
class Silent:
    """A component that never answers the requests it receives."""

    def handle_message(self, msg):
        return None


class AbuseTestsBase(unittest.TestCase):
    timeout = 60
    settings = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.provider = yield start_provider(self, self.settings,
                                             handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"}),
                                                       ("silent", Silent(), {"SUBSCRIPTIONS": "silent"})])
        self.stats = self.provider.ws.stats

    @defer.inlineCallbacks
    def raw(self, host="127.0.0.1"):
        peer = RawPeer()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.provider.port, bindAddress=(host, 0))
        yield connectProtocol(endpoint, peer)
        yield peer.open
        (welcome,) = yield peer.wait_frames(1)
        peer.welcome = json.loads(welcome[1])
        self.addCleanup(lambda: peer.transport.abortConnection() if peer.transport.connected else None)
        return peer

    @defer.inlineCallbacks
    def assert_bystander_flows(self, bystander=None):
        """An echo round trip for a session that did nothing wrong."""
        peer = bystander or (yield self.raw())
        before = len(peer.frames)
        peer.transport.write(frame(json.dumps({"subject": "echo.by", "body": "still here"}).encode()))
        got = yield peer.wait_frames(before + 1)
        self.assertEqual(json.loads(got[-1][1])["body"], "still here")
        return peer


class SlowlorisTests(AbuseTestsBase):
    settings = {"HANDSHAKE_TIMEOUT_SEC": "1", "MAX_HANDSHAKES_PER_ADDRESS": "4", "MAX_PENDING_HANDSHAKES": "16"}

    @defer.inlineCallbacks
    def test_dripping_upgrades_are_capped_per_address_and_timed_out(self):
        drippers = []
        for _ in range(40):
            d = Dripper(0.1)
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.provider.port,
                                                     bindAddress=("127.0.0.2", 0)), d)
            drippers.append(d)
        # The bystander, from another address, gets its welcome while they drip.
        bystander = yield self.assert_bystander_flows()
        answers = yield defer.gatherResults([d.lost for d in drippers])
        busy = [a for a in answers if a.startswith(b"HTTP/1.1 503")]
        timed_out = [a for a in answers if a.startswith(b"HTTP/1.1 408")]
        self.assertEqual((len(busy), len(timed_out)), (32, 8))
        self.assertEqual(self.stats.refusals["address_handshakes"], 32)
        self.assertEqual(self.stats.handshake_timeouts, 8)
        self.assertEqual(self.stats.handshakes_pending, 0)
        yield self.assert_bystander_flows(bystander)

    @defer.inlineCallbacks
    def test_pending_cap_across_addresses(self):
        self.provider.ws.handshake_guard.max_pending = 4
        drippers = []
        for i in range(6):
            d = Dripper(0.1)
            yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.provider.port,
                                                     bindAddress=(f"127.0.1.{i + 1}", 0)), d)
            drippers.append(d)
        answers = yield defer.gatherResults([d.lost for d in drippers])
        self.assertEqual(sum(a.startswith(b"HTTP/1.1 503") for a in answers), 2)
        self.assertEqual(self.stats.refusals["pending_handshakes"], 2)


class WildcardFloodTests(AbuseTestsBase):
    @defer.inlineCallbacks
    def test_many_unrelated_patterns_and_new_subjects(self):
        attackers = []
        for s in range(10):
            peer = yield self.raw()
            peer.transport.write(b"".join(
                frame(json.dumps({"type": "subscribe", "subject": f"w.*.x{s}_{j}", "id": j}).encode())
                for j in range(100)))
            attackers.append(peer)
        for peer in attackers:
            yield peer.wait_frames(101)
        bystander = yield self.raw()
        lattice = self.provider.lattice
        flood = attackers[0]
        flood.transport.write(b"".join(
            frame(json.dumps({"subject": f"w.n{i}.y", "body": "x"}).encode()) for i in range(2000)))
        yield self.assert_bystander_flows(bystander)
        got = yield flood.wait_frames(101 + 2000)  # each: no_responders, nobody matches w.n<i>.y
        self.assertEqual({json.loads(p).get("code") for _, p in got[101:]}, {"no_responders"})
        self.assertLessEqual(len(lattice._subs._cache), lattice._subs.cache_size)
        # One subscribe more does not throw away what is cached for subjects it cannot match.
        lattice._match("echo.cached")
        flood.transport.write(frame(json.dumps({"type": "subscribe", "subject": "w.*.extra", "id": 1}).encode()))
        yield flood.wait_frames(101 + 2001)
        self.assertTrue(lattice._subs.cached("echo.cached"))


class OrphanedRequestTests(AbuseTestsBase):
    @defer.inlineCallbacks
    def test_requests_to_a_silent_subscriber_are_capped_and_released(self):
        attacker = yield self.raw()
        limit = self.provider.config.max_inflight_requests
        attacker.transport.write(b"".join(
            frame(json.dumps({"type": "request", "subject": "silent", "id": i, "timeout_ms": 60000}).encode())
            for i in range(limit + 200)))
        got = yield attacker.wait_frames(1 + 200)
        codes = {json.loads(p)["code"] for _, p in got[1:]}
        self.assertEqual(codes, {"too_many_requests"})
        self.assertEqual(len(self.provider.lattice._pending), limit)
        yield self.assert_bystander_flows()
        attacker.transport.abortConnection()
        yield attacker.closed
        while self.provider.ws.sessions.get(attacker.welcome["session_id"]) is not None:
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(len(self.provider.lattice._pending), 0)
        self.assertEqual(self.provider.ws.inflight, 0)
        # Drain is not held by the orphans: shutdown finishes without waiting DRAIN_TIMEOUT_SEC.
        self.assertEqual(self.stats.requests_cancelled, limit)


class NeverReaderTests(AbuseTestsBase):
    settings = {"OUTBOUND_BUFFER_BYTES": "16384", "SLOW_CONSUMER_GRACE_SEC": "1"}

    @defer.inlineCallbacks
    def test_ping_flood_from_a_peer_that_never_reads_is_closed_4008(self):
        closed = defer.Deferred()

        class Watch:
            def session_opened(self, session):
                pass

            def session_closed(self, session, code, reason):
                if not closed.called:
                    closed.callback(code)

        attacker = yield self.raw()
        attacker.transport.pauseProducing()  # never reads: pongs pile up on the server side
        bystander = yield self.raw()
        self.provider.ws.add_observer(Watch())
        ping = frame(b"p" * 125, opcode=9)
        sent = 0
        while not closed.called and sent < 200_000:
            attacker.transport.write(ping * 500)
            sent += 500
            yield task.deferLater(reactor, 0, lambda: None)
        self.assertEqual(self.stats.slow_consumer_closes, 1)
        yield self.assert_bystander_flows(bystander)
        # The server gives up on it after SLOW_CONSUMER_GRACE_SEC: it never read its close frame.
        self.assertEqual((yield closed), 4008)


class SlowConsumerCloseTests(AbuseTestsBase):
    settings = {"OUTBOUND_BUFFER_BYTES": "65536", "SLOW_CONSUMER_GRACE_SEC": "30"}

    @defer.inlineCallbacks
    def test_a_slow_reader_receives_its_4008(self):
        slow = yield self.raw()
        slow.transport.write(frame(json.dumps({"type": "subscribe", "subject": "flood", "id": 1}).encode()))
        yield slow.wait_frames(2)
        slow.transport.pauseProducing()
        from wsprovider import BrokerMessage
        body = b"x" * 16384
        for _ in range(4000):
            try:
                yield self.provider.publish(BrokerMessage("flood", body))
            except Exception:
                break
        self.assertEqual(self.stats.slow_consumer_closes, 1)
        # Well past Autobahn's 2 s close-handshake timeout the reader catches up, and the
        # close frame is still there for it (the grace is SLOW_CONSUMER_GRACE_SEC).
        yield task.deferLater(reactor, 3, lambda: None)
        slow.transport.resumeProducing()
        yield slow.closed
        self.assertEqual(slow.close_code(), 4008)


class FragmentFloodTests(AbuseTestsBase):
    @defer.inlineCallbacks
    def test_zero_length_continuations_are_capped(self):
        attacker = yield self.raw()
        bystander = yield self.raw()
        attacker.transport.write(frame(b"{", opcode=1, fin=False)
                                 + frame(b"", opcode=0, fin=False) * 20000)
        yield attacker.closed
        self.assertEqual(attacker.close_code(), 1008)
        self.assertEqual(self.stats.fragment_closes, 1)
        yield self.assert_bystander_flows(bystander)

    @defer.inlineCallbacks
    def test_fragments_within_the_cap_still_work(self):
        peer = yield self.raw()
        data = json.dumps({"subject": "echo.f", "body": "in pieces"}).encode()
        pieces = [data[i:i + 4] for i in range(0, len(data), 4)]
        out = frame(pieces[0], opcode=1, fin=False)
        out += b"".join(frame(p, opcode=0, fin=False) for p in pieces[1:-1])
        out += frame(pieces[-1], opcode=0, fin=True)
        peer.transport.write(out)
        got = yield peer.wait_frames(2)
        self.assertEqual(json.loads(got[1][1])["body"], "in pieces")


class StringTests(AbuseTestsBase):
    @defer.inlineCallbacks
    def test_lone_surrogates_are_bad_frame_on_the_same_session(self):
        peer = yield self.raw()
        peer.transport.write(frame(b'{"type":"request","subject":"echo.x","body":"a","id":"\\ud800"}')
                             + frame(b'{"subject":"echo.\\udfff","body":"a","id":2}')
                             + frame(b'{"type":"subscribe","subject":"q","queue":"a\\tb","id":3}'))
        got = yield peer.wait_frames(4)
        answers = [json.loads(p) for _, p in got[1:]]
        self.assertEqual([(a["type"], a["code"], a.get("id")) for a in answers],
                         [("error", "bad_frame", None), ("error", "bad_frame", 2), ("error", "bad_frame", 3)])
        yield self.assert_bystander_flows(peer)


class InvalidTextTests(AbuseTestsBase):
    @defer.inlineCallbacks
    def test_invalid_utf8_fails_before_the_frame_is_complete(self):
        peer = yield self.raw()
        whole = frame(b'{"subject":"echo.x","body":"' + b"\xff" * 2000 + b'"}')
        peer.transport.write(whole[:200])  # the rest never comes
        yield peer.closed
        self.assertEqual(peer.close_code(), 1007)
