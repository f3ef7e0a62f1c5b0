"""The client link's sans-IO core (``wsprovider.link.LinkCore``), without sockets.

Driven with ``task.Clock``, the real in-process lattice and ``FrameTransport``, a recording
transport that stands in for the WebSocket connection (the core's only seam to I/O). Where a
test needs a remote server, ``EchoServer`` plays one by feeding what the core writes back to
it, as a ``websockets`` echo server would; the real-server versions are in test_client.py.
"""

import json

from twisted.internet import task
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from wsprovider import envelope
from wsprovider.config import ProviderConfig
from wsprovider.handlers import EchoHandler
from wsprovider.lattice.local import LocalLattice
from wsprovider.link import ILinkTransport, LinkCore
from wsprovider.loopguard import LoopDetected
from wsprovider.message import BrokerMessage, BufferFull, NoResponders, NotConnected, RequestTimeout
from wsprovider.raw import RAW_CODEC

JSON = envelope.CODECS[envelope.JSON_PROTOCOL]
ADDRESS = "_ws.session.L1"


@implementer(ILinkTransport)
class FrameTransport:
    def __init__(self):
        self.frames = []
        self.open = True
        self.on_write = None

    def write(self, payload, is_binary):
        self.frames.append((payload, is_binary))
        if self.on_write is not None:
            self.on_write(payload, is_binary)

    def writable(self):
        return self.open

    def json(self):
        return [json.loads(p) for p, _ in self.frames]


class Consumer:
    """What ClientLinks gives handlers: publish goes through the link."""

    def __init__(self, core):
        self.core = core

    def publish(self, msg):
        return self.core.send(msg)


class Logged:
    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def warnings(self):
        return [formatEvent(e) for e in self.events if e["log_level"].name in ("warn", "error")]


class LinkCoreTestCase(unittest.TestCase):
    settings = {}

    def setUp(self):
        self.clock = task.Clock()
        self.lattice = LocalLattice(self.clock, strict=False)
        self.config = ProviderConfig.from_mapping({"MODE": "client", "URI": "ws://h:1/", **self.settings})
        self.core = LinkCore(self.lattice, self.clock, self.config, "client link L1 to ws://h:1/", ADDRESS)
        self.got = []
        self.ready_calls = 0
        self.successResultOf(self.lattice.subscribe(ADDRESS, self.core.from_address))
        self.successResultOf(self.lattice.subscribe(ADDRESS + ".>", self.core.from_address))

    def handle(self, pattern=">", handler=None):
        self.successResultOf(self.lattice.subscribe(pattern, handler or self.got.append))

    def attach(self, codec, welcome=None):
        self.transport = FrameTransport()

        def ready():
            self.ready_calls += 1
            self.core.connected()   # what the connector's "connected" hook leads to
        self.core.attach(self.transport, codec, ready)
        if codec is RAW_CODEC:
            self.core.connected()
        elif welcome is not None:
            self.core.received(JSON.encode(welcome)[0], False)
        return self.transport


class RawWireTests(LinkCoreTestCase):

    def test_frames_reach_handlers_with_the_link_address_as_reply_to(self):
        self.handle()
        self.attach(RAW_CODEC)
        self.core.received(b"hello", False)
        self.core.received(b"\x00\x01", True)
        self.assertEqual(self.got, [BrokerMessage("message", b"hello", ADDRESS),
                                    BrokerMessage("binary.message", b"\x00\x01", ADDRESS)])
        self.assertEqual(self.core.messages_in, 2)

    def test_send_text_and_bytes(self):
        t = self.attach(RAW_CODEC)
        self.successResultOf(self.core.send(BrokerMessage("any", "héllo".encode())))
        self.successResultOf(self.core.send(BrokerMessage("any", b"\xff")))
        self.assertEqual(t.frames, [("héllo".encode(), False), (b"\xff", True)])

    def test_request_takes_the_next_frame_and_handlers_do_not_see_it(self):
        self.handle()
        self.attach(RAW_CODEC)
        d = self.core.request("ignored", b"ping", 1000)
        self.core.received(b"pong", False)
        self.assertEqual(self.successResultOf(d), BrokerMessage("message", b"pong"))
        self.assertEqual(self.got, [])
        self.assertEqual(self.core.pending_requests(), 0)

    def test_request_times_out_with_clock(self):
        self.attach(RAW_CODEC)
        d = self.core.request("q", b"x", 250)
        self.clock.advance(0.249)
        self.assertNoResult(d)
        self.clock.advance(0.002)
        self.assertIn("timed out after 250ms", str(self.failureResultOf(d, RequestTimeout).value))
        self.core.received(b"late", False)    # a late answer is a push, not the answer
        self.assertEqual(self.core.pending_requests(), 0)


class EnvelopeWireTests(LinkCoreTestCase):
    settings = {"REMOTE_SUBSCRIPTIONS": "news.>"}

    def welcome(self):
        return self.attach(JSON, envelope.Welcome("s1", "srv.s1", envelope.JSON_PROTOCOL))

    def test_welcome_makes_it_ready_and_subscribes(self):
        t = self.welcome()
        self.assertEqual(self.ready_calls, 1)
        self.assertEqual((self.core.remote_session_id, self.core.remote_reply_to), ("s1", "srv.s1"))
        self.assertEqual(t.json(), [{"type": "subscribe", "subject": "news.>"}])

    def test_message_without_welcome_also_makes_it_ready(self):
        self.handle()
        self.attach(JSON)
        self.core.received(b'{"subject":"a","body":"x"}', False)
        self.assertEqual(self.ready_calls, 1)
        self.assertEqual(self.got, [BrokerMessage("a", b"x", ADDRESS)])

    def test_own_address_maps_both_ways(self):
        self.handle()
        t = self.welcome()
        self.core.received(b'{"subject":"srv.s1","body":"direct"}', False)
        self.core.received(b'{"subject":"srv.s1.x.y","body":"sub"}', False)
        self.assertEqual([m.subject for m in self.got], ["message", "x.y"])
        self.successResultOf(self.lattice.publish(BrokerMessage(ADDRESS + ".a.b", b"out")))
        self.assertEqual(t.json()[-1]["subject"], "a.b")

    def test_request_reply_by_minted_subject(self):
        t = self.welcome()
        d = self.core.request("svc.echo", b"hi", 1000)
        frame = t.json()[-1]
        self.assertEqual(frame["reply_to"], f"srv.s1._r.{frame['id']}")
        self.core.received(json.dumps({"subject": frame["reply_to"], "body": "re: hi"}).encode(), False)
        self.assertEqual(self.successResultOf(d).body, b"re: hi")

    def test_error_frame_fails_its_request(self):
        t = self.welcome()
        d = self.core.request("nobody", b"x", 1000)
        frame_id = t.json()[-1]["id"]
        self.core.received(JSON.encode(envelope.Error("no_responders", "nobody there", frame_id))[0], False)
        self.assertIn("no_responders", str(self.failureResultOf(d, NoResponders).value))

    def test_component_reply_to_is_routed_back(self):
        answers = []
        self.handle("replies.here", answers.append)
        t = self.welcome()
        self.successResultOf(self.core.send(BrokerMessage("ask", b"?", "replies.here")))
        minted = t.json()[-1]["reply_to"]
        self.assertTrue(minted.startswith("srv.s1._r."))
        self.core.received(json.dumps({"subject": minted, "body": "!"}).encode(), False)
        self.assertEqual(answers, [BrokerMessage("replies.here", b"!", ADDRESS)])

    def test_owed_reply_goes_back_once(self):
        t = self.welcome()
        self.core.received(b'{"subject":"ask","body":"now?","reply_to":"peer.7"}', False)
        self.assertIn("peer.7", self.core.replies.owed)
        self.successResultOf(self.lattice.publish(BrokerMessage("peer.7", b"first")))
        self.successResultOf(self.lattice.publish(BrokerMessage("peer.7", b"second")))   # not owed any more
        self.assertEqual([f["body"] for f in t.json() if f["subject"] == "peer.7"], ["first"])
        self.assertNotIn("hops", t.json()[-1])   # an answer to reply_to keeps the request's depth

    def test_owed_reply_expires(self):
        self.welcome()
        self.core.received(b'{"subject":"ask","body":"?","reply_to":"peer.7"}', False)
        self.clock.advance(self.config.max_request_timeout_ms / 1000.0 + 1)
        self.assertNotIn("peer.7", self.core.replies.owed)

    def test_disconnect_fails_sent_requests_and_keeps_buffered_ones(self):
        t = self.welcome()
        sent = self.core.request("a", b"1", 5000)
        t.open = False
        buffered = self.core.request("b", b"2", 5000)
        self.core.disconnected(NotConnected("lost"))
        self.failureResultOf(sent, NotConnected)
        self.assertNoResult(buffered)
        t2 = self.welcome()
        frame = t2.json()[-1]
        self.assertEqual(frame["subject"], "b")
        self.core.received(json.dumps({"subject": frame["reply_to"], "body": "ok"}).encode(), False)
        self.assertEqual(self.successResultOf(buffered).body, b"ok")

    def test_unusable_frame_is_logged_not_raised(self):
        log = Logged(self)
        self.welcome()
        self.core.received(b'{"subject":"a","hops":-1}', False)
        self.core.received(b'{"type":"nonsense"}', False)
        self.assertEqual(len(log.warnings()), 2)
        self.assertIn("hops", log.warnings()[0])


class OutboundBufferUseTests(LinkCoreTestCase):
    settings = {"OFFLINE_BUFFER_BYTES": "100"}

    def test_buffered_in_order_until_connected(self):
        for i in range(3):
            self.successResultOf(self.core.send(BrokerMessage("s", f"m{i}".encode())))
        self.assertEqual(len(self.core.buffer), 3)
        t = self.attach(RAW_CODEC)
        self.assertEqual([p for p, _ in t.frames], [b"m0", b"m1", b"m2"])
        self.assertEqual(self.core.buffer.bytes, 0)

    def test_full_buffer_refuses_clearly(self):
        self.successResultOf(self.core.send(BrokerMessage("s", b"x" * 90)))
        e = self.failureResultOf(self.core.send(BrokerMessage("s", b"x" * 20)), BufferFull).value
        self.assertIn("OFFLINE_BUFFER_BYTES=100", str(e))
        self.assertIn("not connected", str(e))
        self.failureResultOf(self.core.request("s", b"y" * 20, 1000), BufferFull)

    def test_buffered_request_that_times_out_leaves_the_buffer(self):
        d = self.core.request("s", b"x", 100)
        self.assertEqual(len(self.core.buffer), 1)
        self.clock.advance(0.2)
        self.failureResultOf(d, RequestTimeout)
        self.assertEqual(len(self.core.buffer), 0)

    def test_close_fails_buffered_requests_and_refuses_more(self):
        log = Logged(self)
        self.successResultOf(self.core.send(BrokerMessage("s", b"1")))
        d = self.core.request("s", b"2", 1000)
        self.core.close("was deleted", NotConnected("closed"))
        self.assertIn("not sent", str(self.failureResultOf(d, NotConnected).value))
        self.failureResultOf(self.core.send(BrokerMessage("s", b"3")), NotConnected)
        self.assertTrue(any("1 buffered message(s) were never sent" in w for w in log.warnings()))


class EchoServer:
    """Plays a remote server that sends every frame back (a turn of the clock later)."""

    def __init__(self, testcase, transport):
        self.testcase = testcase
        self.writes = 0
        transport.on_write = self.echo

    def echo(self, payload, is_binary):
        self.writes += 1
        self.testcase.clock.callLater(0, self.testcase.core.received, payload, is_binary)

    def run(self, turns=1000):
        for _ in range(turns):
            if not self.testcase.clock.getDelayedCalls():
                return
            self.testcase.clock.advance(0)
        raise AssertionError(f"still bouncing after {turns} turns ({self.writes} writes)")


class LoopTests(LinkCoreTestCase):
    settings = {"MAX_REPLY_HOPS": "8", "MAX_ANSWERS_PER_SEC": "0"}

    def echo_handler(self):
        self.handle(">", EchoHandler(Consumer(self.core)).handle_message)

    def test_envelope_echo_loop_is_cut_by_reply_depth(self):
        log = Logged(self)
        self.echo_handler()
        t = self.attach(JSON, envelope.Welcome("s1", "srv.s1"))
        server = EchoServer(self, t)
        self.core.received(b'{"subject":"greeting","body":"hi"}', False)
        server.run()
        hops = [f.get("hops", 0) for f in t.json()]
        self.assertEqual(hops, list(range(1, 9)))     # eight answers, then the ninth is refused
        self.assertEqual(self.core.guard.cut, 1)
        [warning] = [w for w in log.warnings() if "loop cut" in w]
        self.assertIn("MAX_REPLY_HOPS=8", warning)
        self.assertIn("wsprovider.handlers:echo", warning)

    def test_raw_echo_loop_is_cut_by_recognising_the_echo(self):
        self.echo_handler()
        t = self.attach(RAW_CODEC)
        server = EchoServer(self, t)
        self.core.received(b"hello", False)
        server.run()
        self.assertEqual(server.writes, 8)
        self.assertEqual(self.core.guard.cut, 1)

    def test_a_fresh_message_from_the_server_starts_at_depth_zero(self):
        self.echo_handler()
        t = self.attach(JSON, envelope.Welcome("s1", "srv.s1"))
        for i in range(20):
            self.core.received(json.dumps({"subject": "feed", "body": f"n{i}"}).encode(), False)
        self.assertEqual({f.get("hops") for f in t.json()}, {1})
        self.assertEqual(self.core.guard.cut, 0)

    def test_loop_detected_is_an_error_for_the_sender(self):
        self.attach(JSON, envelope.Welcome("s1", "srv.s1"))
        self.core._last_hops = 8          # as after a chain of eight answers
        d = self.core.send(BrokerMessage(ADDRESS, b"again"))
        self.assertEqual(self.failureResultOf(d, LoopDetected).value.code, "loop_detected")


class AnswerRateGuardTests(LinkCoreTestCase):
    settings = {"MAX_REPLY_HOPS": "0", "MAX_ANSWERS_PER_SEC": "50"}

    def test_transforming_echo_loop_is_cut_by_the_rate_guard(self):
        """A server that answers every frame with something new: no depth, no echo to recognise."""
        log = Logged(self)
        self.handle(">", EchoHandler(Consumer(self.core)).handle_message)
        t = self.attach(RAW_CODEC)
        t.on_write = lambda payload, binary: self.clock.callLater(0, self.core.received, b"re: " + payload[-20:],
                                                                  False)
        self.core.received(b"start", False)
        for _ in range(1000):
            if not self.clock.getDelayedCalls():
                break
            self.clock.advance(0)
        self.assertEqual(len(t.frames), 50)             # one second of burst, then cut
        self.assertTrue(any("MAX_ANSWERS_PER_SEC=50" in w for w in log.warnings()))

    def test_messages_that_are_not_answers_are_not_limited(self):
        t = self.attach(RAW_CODEC)
        for i in range(200):
            self.successResultOf(self.core.send(BrokerMessage("feed", b"x")))
        self.assertEqual(len(t.frames), 200)


class EchoSuppressionTests(LinkCoreTestCase):
    settings = {"OUTBOUND_SUBJECTS": "out.>"}

    def setUp(self):
        LinkCoreTestCase.setUp(self)
        self.successResultOf(self.lattice.subscribe("out.>", self.core.from_outbound))

    def test_server_message_on_an_outbound_subject_is_not_sent_back(self):
        t = self.attach(JSON, envelope.Welcome("s1", "srv.s1"))
        self.core.received(b'{"subject":"out.loop","body":"x"}', False)
        self.assertEqual(t.json(), [])
        self.successResultOf(self.lattice.publish(BrokerMessage("out.first", b"1")))
        self.assertEqual([f["subject"] for f in t.json()], ["out.first"])

    def test_a_copy_coming_back_later_is_recognised_too(self):
        """As on NATS: the lattice hands back an equal message, not the same object."""
        t = self.attach(JSON, envelope.Welcome("s1", "srv.s1"))
        self.core.echoes.expect(BrokerMessage("out.x", b"y", ADDRESS), 1)
        self.assertIsNone(self.core.from_outbound(BrokerMessage("out.x", b"y", ADDRESS)))
        self.successResultOf(self.core.from_outbound(BrokerMessage("out.x", b"y", ADDRESS)))  # only once
        self.assertEqual(len(t.frames), 1)
