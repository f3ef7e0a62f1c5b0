"""Server mode end to end, with real peers: the ``websockets`` library and Autobahn's client."""

import base64
import json
import struct

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest
from zope.interface import implementer

from wsprovider import BrokerMessage, IMessageHandler, MessagingError, NotConnected, RequestTimeout
from wsprovider.handlers import echo

from .peers import AutobahnPeer, WebsocketsPeer, start_provider, ws_url
from .test_fastframes import RawPeer, frame


@implementer(IMessageHandler)
class Recorder:
    """A Python component that records what it receives."""

    def __init__(self):
        self.received = []
        self.waiting = []

    def handle_message(self, msg):
        self.received.append(msg)
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(msg)

    def next(self):
        d = defer.Deferred()
        self.waiting.append(d)
        return d


class ServerTestsMixin:
    peer_class = None
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.recorder = Recorder()
        self.provider = yield start_provider(self, handlers=[
            ("echo", echo, {"SUBSCRIPTIONS": "echo.>"}),
            ("recorder", self.recorder, {"SUBSCRIPTIONS": "app.>"}),
        ])

    def connect(self, **kwargs):
        return self.peer_class.connect(ws_url(self.provider), **kwargs)

    @defer.inlineCallbacks
    def test_welcome(self):
        peer = yield self.connect()
        self.assertEqual(peer.welcome["type"], "welcome")
        self.assertEqual(peer.welcome["protocol"], "wsprovider.v1.json")
        self.assertEqual(peer.welcome["reply_to"], "_ws.session." + peer.welcome["session_id"])
        self.assertGreaterEqual(len(peer.welcome["session_id"]), 20)  # 128 random bits
        sessions = self.provider.list_sessions()
        self.assertEqual([s["session_id"] for s in sessions], [peer.session_id])
        self.assertEqual(sessions[0]["subprotocol"], "wsprovider.v1.json")
        self.assertTrue(sessions[0]["peer"].startswith("tcp4:127.0.0.1:"))
        yield peer.close()

    @defer.inlineCallbacks
    def test_message_reaches_handler_with_session_reply_to(self):
        peer = yield self.connect()
        got = self.recorder.next()
        yield peer.send_json({"subject": "app.orders", "body": "hello"})
        msg = yield got
        self.assertEqual(msg, BrokerMessage("app.orders", b"hello", peer.address))
        yield peer.close()

    @defer.inlineCallbacks
    def test_handler_reply_routed_to_session(self):
        a = yield self.connect()
        b = yield self.connect()
        yield a.send_json({"subject": "echo.x", "body": "from a"})
        yield b.send_json({"subject": "echo.x", "body": "from b"})
        reply_a = yield a.recv_json()
        reply_b = yield b.recv_json()
        self.assertEqual(reply_a, {"type": "message", "subject": a.address, "body": "from a"})
        self.assertEqual(reply_b, {"type": "message", "subject": b.address, "body": "from b"})
        yield a.close()
        yield b.close()

    @defer.inlineCallbacks
    def test_reply_to_own_subsubject(self):
        peer = yield self.connect()
        yield peer.send_json({"subject": "echo.x", "body": "r", "reply_to": peer.address + ".req7"})
        reply = yield peer.recv_json()
        self.assertEqual(reply["subject"], peer.address + ".req7")
        yield peer.close()

    @defer.inlineCallbacks
    def test_targeted_send(self):
        a = yield self.connect()
        b = yield self.connect()
        yield self.provider.send_to_session(b.session_id, BrokerMessage("notification", b"only b"))
        frame = yield b.recv_json()
        self.assertEqual(frame, {"type": "message", "subject": "notification", "body": "only b"})
        # a got nothing: the next thing a sees is its own echo.
        yield a.send_json({"subject": "echo.a", "body": "ping"})
        frame = yield a.recv_json()
        self.assertEqual(frame["body"], "ping")
        yield a.close()
        yield b.close()

    @defer.inlineCallbacks
    def test_send_to_unknown_session_fails(self):
        with self.assertRaises(NotConnected):
            yield self.provider.send_to_session("nope", BrokerMessage("x", b""))

    @defer.inlineCallbacks
    def test_broadcast_to_many(self):
        peers = []
        for _ in range(25):
            peers.append((yield self.connect()))
        count = yield self.provider.broadcast_to_clients(BrokerMessage("announcement", b"update"))
        self.assertEqual(count, 25)
        frames = yield defer.gatherResults([p.recv_json() for p in peers])
        self.assertEqual(frames, [{"type": "message", "subject": "announcement", "body": "update"}] * 25)
        yield defer.gatherResults([p.close() for p in peers])

    @defer.inlineCallbacks
    def test_request_to_session(self):
        peer = yield self.connect()
        d = self.provider.request(peer.address, b"question", 5000)
        frame = yield peer.recv_json()
        self.assertEqual(frame["body"], "question")
        self.assertTrue(frame["reply_to"].startswith("_INBOX."))
        yield peer.send_json({"subject": frame["reply_to"], "body": "answer"})
        reply = yield d
        self.assertEqual(reply.body, b"answer")
        # One response per reply subject: a second answer is refused.
        yield peer.send_json({"subject": frame["reply_to"], "body": "again"})
        err = yield peer.recv_json()
        self.assertEqual(err["code"], "permission_denied")
        yield peer.close()

    @defer.inlineCallbacks
    def test_refused_answer_does_not_use_up_the_reply(self):
        peer = yield self.connect()
        d = self.provider.request(peer.address, b"question", 5000)
        frame = yield peer.recv_json()
        # An answer with a reply_to the peer may not use is refused, and the reply is still owed.
        yield peer.send_json({"subject": frame["reply_to"], "body": "x", "reply_to": "$SYS.x"})
        self.assertEqual((yield peer.recv_json())["code"], "permission_denied")
        yield peer.send_json({"subject": frame["reply_to"], "body": "answer"})
        self.assertEqual((yield d).body, b"answer")
        yield peer.close()

    @defer.inlineCallbacks
    def test_request_to_session_times_out(self):
        peer = yield self.connect()
        d = self.provider.request(peer.address, b"question", 200)
        yield peer.recv_json()
        err = yield self.assertFailure(d, RequestTimeout)
        self.assertIn("timed out after 200ms", str(err))
        self.assertEqual(len(self.provider.lattice._pending), 0)
        yield peer.close()

    @defer.inlineCallbacks
    def test_session_disconnects_during_request(self):
        peer = yield self.connect()
        d = self.provider.request(peer.address, b"question", 10000)
        yield peer.recv_json()
        yield peer.close()
        err = yield self.assertFailure(d, NotConnected)
        self.assertIn("disconnected before replying", str(err))
        self.assertEqual(len(self.provider.lattice._pending), 0)

    @defer.inlineCallbacks
    def test_peer_request_to_handler(self):
        peer = yield self.connect()
        yield peer.send_json({"type": "request", "id": "r1", "subject": "echo.svc", "body": "hi"})
        reply = yield peer.recv_json()
        self.assertEqual(reply["type"], "reply")
        self.assertEqual(reply["id"], "r1")
        self.assertEqual(reply["body"], "hi")
        yield peer.close()

    @defer.inlineCallbacks
    def test_peer_request_no_responders(self):
        peer = yield self.connect()
        yield peer.send_json({"type": "request", "id": 9, "subject": "nobody.home", "body": ""})
        err = yield peer.recv_json()
        self.assertEqual((err["type"], err["code"], err["id"]), ("error", "no_responders", 9))
        yield peer.close()

    @defer.inlineCallbacks
    def test_peer_request_timeout(self):
        peer = yield self.connect()
        other = yield self.connect()
        yield other.subscribe("svc.slow")
        yield peer.send_json({"type": "request", "id": 1, "subject": "svc.slow", "timeout_ms": 100})
        yield other.recv_json()  # it never answers
        err = yield peer.recv_json()
        self.assertEqual((err["code"], err["id"]), ("timeout", 1))
        yield peer.close()
        yield other.close()

    @defer.inlineCallbacks
    def test_peer_to_peer_request_reply(self):
        asker = yield self.connect()
        answerer = yield self.connect()
        yield answerer.subscribe("svc.time")
        yield asker.send_json({"type": "request", "id": 5, "subject": "svc.time", "body": "now?"})
        question = yield answerer.recv_json()
        yield answerer.send_json({"subject": question["reply_to"], "body": "noon"})
        reply = yield asker.recv_json()
        self.assertEqual((reply["type"], reply["id"], reply["body"]), ("reply", 5, "noon"))
        yield asker.close()
        yield answerer.close()

    @defer.inlineCallbacks
    def test_wildcard_subscribe_and_unsubscribe(self):
        sub = yield self.connect()
        pub = yield self.connect()
        yield sub.subscribe("news.*")
        yield sub.subscribe("sport.>")
        yield pub.send_json({"subject": "news.world", "body": "1"})
        yield pub.send_json({"subject": "sport.ball.goal", "body": "2"})
        got = [(yield sub.recv_json()), (yield sub.recv_json())]
        self.assertEqual([(f["subject"], f["body"]) for f in got], [("news.world", "1"), ("sport.ball.goal", "2")])
        self.assertEqual(got[0]["reply_to"], pub.address)
        yield sub.send_json({"type": "unsubscribe", "subject": "news.*"})
        self.assertEqual((yield sub.recv_json()), {"type": "unsubscribed", "subject": "news.*"})
        # Nobody listens any more: the publisher is told, nothing vanishes silently.
        yield pub.send_json({"subject": "news.world", "body": "3"})
        err = yield pub.recv_json()
        self.assertEqual(err["code"], "no_responders")
        yield sub.close()
        yield pub.close()

    @defer.inlineCallbacks
    def test_seed_frames(self):
        peer = yield self.connect()
        got = self.recorder.next()
        yield peer.send_json({"subject": "app.a", "body": "text body", "reply_to": peer.address})
        self.assertEqual((yield got).body, b"text body")
        got = self.recorder.next()
        yield peer.send_json({"subject": "app.b", "body": [0, 1, 255]})
        self.assertEqual((yield got).body, b"\x00\x01\xff")
        self.provider.lattice.strict = True
        other = self.recorder.next()
        yield self.provider.receive_link_config_as_source("plain", {"SUBSCRIPTIONS": "message"}, handler=Recorder())
        plain = self.provider.components["plain"]
        got = plain.next()
        yield peer.send("just some text")
        msg = yield got
        self.assertEqual((msg.subject, msg.body), ("message", b"just some text"))
        self.assertFalse(other.called)
        yield peer.close()

    @defer.inlineCallbacks
    def test_body_base64_round_trip(self):
        peer = yield self.connect()
        raw = bytes(range(256))
        yield peer.send_json({"subject": "echo.bin", "body_base64": base64.b64encode(raw).decode()})
        frame = yield peer.recv_json()
        self.assertNotIn("body", frame)
        self.assertEqual(base64.b64decode(frame["body_base64"]), raw)
        yield peer.close()

    @defer.inlineCallbacks
    def test_malformed_frames_get_errors_and_session_survives(self):
        peer = yield self.connect()
        cases = [
            ("{not json", "bad_json"),
            (json.dumps({"subject": ""}), "bad_frame"),
            (json.dumps({"subject": "a b"}), "bad_frame"),
            (json.dumps({"subject": "a.*"}), "bad_frame"),
            (json.dumps({"subject": "a", "body": 5}), "bad_frame"),
            (json.dumps({"subject": "a", "body_base64": "!!"}), "bad_frame"),
            (json.dumps({"subject": "a", "body": [300]}), "bad_frame"),
            (json.dumps({"type": "frobnicate", "id": 3}), "bad_frame"),
            (json.dumps({"type": "request", "subject": "a"}), "bad_frame"),
            (json.dumps({"subject": "a", "reply_to": 5}), "bad_frame"),
            (json.dumps({"subject": "a", "body": "x", "body_base64": "eA=="}), "bad_frame"),
        ]
        for data, code in cases:
            yield peer.send(data)
            err = yield peer.recv_json()
            self.assertEqual((err["type"], err["code"]), ("error", code), data)
            self.assertTrue(err["message"])
        self.assertIn("frobnicate", (yield self._error_for(peer, json.dumps({"type": "frobnicate"})))["message"])
        yield peer.send_json({"subject": "echo.ok", "body": "still here"})
        self.assertEqual((yield peer.recv_json())["body"], "still here")
        yield peer.close()

    @defer.inlineCallbacks
    def _error_for(self, peer, data):
        yield peer.send(data)
        return (yield peer.recv_json())

    @defer.inlineCallbacks
    def test_system_subjects_denied(self):
        peer = yield self.connect()
        for subject in ("$SYS.x", "_INBOX.abc", "wasmbus.ctl.x", "runtime.host.1", "_ws.broadcast.x"):
            err = yield self._error_for(peer, json.dumps({"subject": subject, "body": ""}))
            self.assertEqual(err["code"], "permission_denied", subject)
            self.assertIn("deny", err["message"])
        for pattern in ("$SYS.>", "_INBOX.*", ">", "_ws.session.*"):
            err = yield self._error_for(peer, json.dumps({"type": "subscribe", "subject": pattern}))
            self.assertEqual(err["code"], "permission_denied", pattern)
        yield peer.close()


class WebsocketsServerTests(ServerTestsMixin, unittest.TestCase):
    peer_class = WebsocketsPeer

    @defer.inlineCallbacks
    def test_oversized_frame_closes_1009(self):
        peer = yield self.connect(max_size=None)
        yield peer.send("x" * (65536 + 1))
        code, _ = yield peer.wait_closed()
        self.assertEqual(code, 1009)

    @defer.inlineCallbacks
    def test_no_subprotocol_defaults_to_json(self):
        peer = yield WebsocketsPeer.connect(ws_url(self.provider), subprotocols=None)
        self.assertEqual(peer.welcome["protocol"], "wsprovider.v1.json")
        yield peer.close()

    @defer.inlineCallbacks
    def test_unknown_subprotocol_refused(self):
        import websockets
        with self.assertRaises(websockets.exceptions.InvalidStatus) as cm:
            yield WebsocketsPeer.connect(ws_url(self.provider), subprotocols=("mqtt",))
        self.assertEqual(cm.exception.response.status_code, 400)

    @defer.inlineCallbacks
    def test_msgpack_subprotocol(self):
        import msgpack
        peer = yield WebsocketsPeer.connect(ws_url(self.provider), subprotocols=("wsprovider.v1.msgpack",),
                                            expect_welcome=False)
        welcome = msgpack.unpackb((yield peer.recv()))
        self.assertEqual(welcome["protocol"], "wsprovider.v1.msgpack")
        yield peer.send(msgpack.packb({"subject": "echo.m", "body": b"\xff\x00"}))
        frame = msgpack.unpackb((yield peer.recv()))
        self.assertEqual(frame["body"], b"\xff\x00")
        yield peer.close()


class AutobahnServerTests(ServerTestsMixin, unittest.TestCase):
    peer_class = AutobahnPeer

    @defer.inlineCallbacks
    def test_binary_frame_is_seed_binary_message(self):
        peer = yield self.connect()
        plain = Recorder()
        yield self.provider.receive_link_config_as_source("bin", {"SUBSCRIPTIONS": "binary.message"}, handler=plain)
        got = plain.next()
        peer.send(b"\x01\x02", binary=True)
        msg = yield got
        self.assertEqual((msg.subject, msg.body), ("binary.message", b"\x01\x02"))
        yield peer.close()

    @defer.inlineCallbacks
    def test_slow_consumer_closed_while_others_flow(self):
        yield self.provider.shutdown()
        closed = []

        class Watch:
            def session_opened(self, session):
                pass

            def session_closed(self, session, code, reason):
                closed.append((session.session_id, code))

        self.provider = yield start_provider(self, {"OUTBOUND_BUFFER_BYTES": "65536"},
                                             handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        self.provider.ws.add_observer(Watch())
        slow = yield self.connect()
        fast = yield self.connect()
        slow.protocol.transport.pauseProducing()  # stop reading: the kernel buffers fill, then ours
        body = b"x" * 16384
        sent = 0
        while sent < 4000:
            try:
                yield self.provider.send_to_session(slow.session_id, BrokerMessage("flood", body))
            except NotConnected:
                break
            sent += 1
            if sent % 50 == 0:
                yield task.deferLater(reactor, 0, lambda: None)  # let the reactor write
        self.assertLess(sent, 4000, "the slow consumer was never closed")
        self.assertEqual(self.provider.ws.stats.slow_consumer_closes, 1)
        # The other session still flows.
        fast.send_json({"subject": "echo.f", "body": "alive"})
        self.assertEqual((yield fast.recv_json())["body"], "alive")
        slow.protocol.transport.resumeProducing()
        code, _ = yield slow.factory.closed
        self.assertIn(code, (4008, 1006))
        self.assertEqual([c for s, c in closed if s == slow.session_id], [4008])
        yield fast.close()


class ConsumerContractTests(unittest.TestCase):
    timeout = 10

    @defer.inlineCallbacks
    def test_handler_error_reported_to_peer(self):
        @implementer(IMessageHandler)
        class Failing:
            def handle_message(self, msg):
                raise MessagingError("boom")

        provider = yield start_provider(self, handlers=[("f", Failing(), {"SUBSCRIPTIONS": "f"})])
        peer = yield WebsocketsPeer.connect(ws_url(provider))
        yield peer.send_json({"subject": "f", "body": "x"})
        err = yield peer.recv_json()
        self.assertEqual((err["code"], err["message"]), ("error", "boom"))
        yield peer.close()

    @defer.inlineCallbacks
    def test_deferred_handler_error_reported_to_peer(self):
        @implementer(IMessageHandler)
        class Later:
            def handle_message(self, msg):
                return task.deferLater(reactor, 0, lambda: 1 / 0)

        provider = yield start_provider(self, handlers=[("l", Later(), {"SUBSCRIPTIONS": "l"})])
        peer = yield WebsocketsPeer.connect(ws_url(provider))
        yield peer.send_json({"subject": "l", "body": "x", "id": 4})
        err = yield peer.recv_json()
        self.assertEqual((err["code"], err["id"]), ("handler_error", 4))
        self.assertIn("division by zero", err["message"])
        yield peer.close()


class OutboundLimitTests(unittest.TestCase):
    """MAX_MESSAGE_SIZE holds both ways; the sender of an oversized message is told."""

    timeout = 10

    @defer.inlineCallbacks
    def test_oversized_message_to_session_fails_for_the_sender(self):
        provider = yield start_provider(self, {"MAX_MESSAGE_SIZE": "1024"},
                                        handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        peer = yield WebsocketsPeer.connect(ws_url(provider))
        self.assertEqual(peer.welcome["max_message_size"], 1024)
        with self.assertRaises(MessagingError) as cm:
            yield provider.publish(BrokerMessage(peer.address, b"x" * 2000))
        self.assertEqual(cm.exception.code, "too_large")
        self.assertIn("MAX_MESSAGE_SIZE", str(cm.exception))
        # The session is unaffected and still gets what fits.
        yield provider.send_to_session(peer.session_id, BrokerMessage("small", b"ok"))
        self.assertEqual((yield peer.recv_json())["body"], "ok")
        yield peer.close()


class IdleTimeoutTests(unittest.TestCase):
    """Server pings; a peer that stops answering is dropped, one that answers stays."""

    timeout = 20

    @defer.inlineCallbacks
    def test_unresponsive_peer_is_dropped(self):
        provider = yield start_provider(self, {"PING_INTERVAL_SEC": "1", "PING_TIMEOUT_SEC": "2"})
        closed = defer.Deferred()

        class Watch:
            def session_opened(self, session):
                pass

            def session_closed(self, session, code, reason):
                if not closed.called:
                    closed.callback((session.session_id, code))

        provider.ws.add_observer(Watch())
        lively = yield WebsocketsPeer.connect(ws_url(provider))  # answers pings by itself
        silent = yield AutobahnPeer.connect(ws_url(provider))
        silent.protocol.transport.pauseProducing()  # reads nothing more, so never pongs
        session_id, code = yield closed
        self.assertEqual((session_id, code), (silent.session_id, 1006))
        self.assertEqual([s["session_id"] for s in provider.list_sessions()], [lively.session_id])
        silent.protocol.transport.resumeProducing()
        yield silent.factory.closed
        yield lively.close()


class HeldSubscribeLattice:
    """The embedded lattice with each peer subscription's answer held until released.

    Stands in for a lattice whose subscribe takes a round trip (NATS), so that the order
    of acknowledgements can be tested deterministically. Everything else is the real
    ``LocalLattice``.
    """

    def __init__(self):
        from wsprovider.lattice.local import LocalLattice
        self._real = LocalLattice()
        self.held = []

    def __getattr__(self, name):
        return getattr(self._real, name)

    def subscribe(self, pattern, callback, queue=None, on_status=None):
        d = self._real.subscribe(pattern, callback, queue, on_status)
        if not pattern.startswith("room."):
            return d
        held = defer.Deferred()
        self.held.append(lambda: d.chainDeferred(held))
        return held

    def release(self):
        held, self.held = self.held, []
        for go in held:
            go()


class PendingSubscribeTests(unittest.TestCase):
    timeout = 10

    @defer.inlineCallbacks
    def setUp(self):
        self.lattice = HeldSubscribeLattice()
        self.provider = yield start_provider(self, lattice=self.lattice)
        self.peer = yield WebsocketsPeer.connect(ws_url(self.provider))
        self.addCleanup(self.peer.close)

    @defer.inlineCallbacks
    def test_repeat_subscribe_is_acknowledged_only_once_live(self):
        yield self.peer.send_json({"type": "subscribe", "subject": "room.a", "id": 1})
        yield self.peer.send_json({"type": "subscribe", "subject": "room.a", "id": 2})
        yield self.peer.send_json({"type": "ping", "id": "p"})
        self.assertEqual((yield self.peer.recv_json()), {"type": "pong", "id": "p"})  # no early ack
        self.lattice.release()
        acks = [(yield self.peer.recv_json()), (yield self.peer.recv_json())]
        self.assertEqual(acks, [{"type": "subscribed", "subject": "room.a", "id": 1},
                                {"type": "subscribed", "subject": "room.a", "id": 2}])
        yield self.provider.publish(BrokerMessage("room.a", b"once"))
        self.assertEqual((yield self.peer.recv_json())["body"], "once")
        yield self.peer.send_json({"type": "ping"})
        self.assertEqual((yield self.peer.recv_json()), {"type": "pong"})  # delivered once only

    @defer.inlineCallbacks
    def test_unsubscribe_and_resubscribe_while_pending_leaves_one_subscription(self):
        yield self.peer.send_json({"type": "subscribe", "subject": "room.b", "id": 1})
        yield self.peer.send_json({"type": "unsubscribe", "subject": "room.b", "id": 2})
        self.assertEqual((yield self.peer.recv_json()), {"type": "unsubscribed", "subject": "room.b", "id": 2})
        yield self.peer.send_json({"type": "subscribe", "subject": "room.b", "id": 3})
        yield self.peer.send_json({"type": "ping"})
        self.assertEqual((yield self.peer.recv_json()), {"type": "pong"})
        self.lattice.release()
        self.assertEqual((yield self.peer.recv_json()), {"type": "subscribed", "subject": "room.b", "id": 3})
        yield self.provider.publish(BrokerMessage("room.b", b"once"))
        self.assertEqual((yield self.peer.recv_json())["body"], "once")
        yield self.peer.send_json({"type": "ping"})
        self.assertEqual((yield self.peer.recv_json()), {"type": "pong"})
        self.assertEqual(len(self.lattice._real._match("room.b")), 1)


class ReadmeEmbeddingTests(unittest.TestCase):
    timeout = 10

    @defer.inlineCallbacks
    def test_embedding_example_serves(self):
        """README's "Embedding it in a Twisted application" example, on a free port."""
        import os
        import re
        from twisted.application import service
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        with open(os.path.join(root, "README.rst"), encoding="utf-8") as f:
            text = f.read()
        text = text[text.index("\nEmbedding it in a Twisted application\n"):]
        block = re.search(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text).group(1)
        code = "\n".join(line[4:] for line in block.splitlines())
        self.assertIn('"URI": "127.0.0.1:8080"', code)
        code = code.replace('"URI": "127.0.0.1:8080"', '"URI": "tcp:0:interface=127.0.0.1"')
        namespace = {"__name__": "readme_example"}
        exec(compile(code, "README.rst", "exec"), namespace)
        app_service = service.IService(namespace["application"])
        app_service.startService()
        self.addCleanup(app_service.stopService)
        provider = namespace["provider"]
        yield provider.when_ready()
        peer = yield WebsocketsPeer.connect(ws_url(provider))
        yield peer.send_json({"subject": "greet.me", "body": "bob"})
        self.assertEqual((yield peer.recv_json())["body"], "hello bob")
        yield peer.close()


class ServerEdgeCaseTests(unittest.TestCase):
    """Edge cases found in review, pinned with raw frames where the wire matters."""

    timeout = 20

    @defer.inlineCallbacks
    def raw_peer(self, provider):
        peer = RawPeer()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", provider.port), peer)
        yield peer.open
        (welcome,) = yield peer.wait_frames(1)
        peer.welcome = json.loads(welcome[1])
        self.addCleanup(lambda: peer.transport.abortConnection() if peer.transport.connected else None)
        return peer

    @defer.inlineCallbacks
    def test_no_data_frames_after_the_close_frame(self):
        """Once the service has sent its close frame, nothing more goes to the peer (RFC 6455 5.5.1),
        and whatever the peer still sends meanwhile does not blow up in the service."""
        provider = yield start_provider(self)
        peer = yield self.raw_peer(provider)
        peer.transport.write(frame(json.dumps({"type": "subscribe", "subject": "news"}).encode()))
        yield peer.wait_frames(2)  # subscribed
        yield provider.ws.disconnect(peer.welcome["session_id"])
        yield peer.wait_frames(3)
        self.assertEqual(peer.frames[2][0], 8)  # our close frame; the peer has not answered yet
        count = yield provider.broadcast_to_clients(BrokerMessage("all", b"late broadcast"))
        self.assertEqual(count, 0)
        with self.assertRaises(MessagingError) as cm:
            yield provider.publish(BrokerMessage("news", b"late news"))
        self.assertEqual(cm.exception.code, "not_connected")
        # A frame that crossed our close frame gets no answer either (and no exception).
        peer.transport.write(frame(json.dumps({"type": "ping", "id": 1}).encode())
                             + frame(struct.pack("!H", 1000), opcode=8))
        yield peer.closed
        self.assertEqual([op for op, _ in peer.frames[3:]], [])

    @defer.inlineCallbacks
    def test_slow_consumer_without_session_tracking_releases_its_subscriptions(self):
        provider = yield start_provider(self, {"OUTBOUND_BUFFER_BYTES": "65536",
                                               "ENABLE_SESSION_TRACKING": "false"})
        closed = defer.Deferred()

        class Watch:
            def session_opened(self, session):
                pass

            def session_closed(self, session, code, reason):
                closed.callback(code)  # never fired (test timeout) when the session is not cleaned up

        provider.ws.add_observer(Watch())
        slow = yield AutobahnPeer.connect(ws_url(provider))
        yield slow.subscribe("flood")
        slow.protocol.transport.pauseProducing()
        body = b"x" * 16384
        sent = 0
        while sent < 4000:
            try:
                yield provider.publish(BrokerMessage("flood", body))
            except NotConnected:
                break
            sent += 1
            if sent % 50 == 0:
                yield task.deferLater(reactor, 0, lambda: None)
        self.assertLess(sent, 4000, "the slow consumer was never closed")
        slow.protocol.transport.resumeProducing()
        yield slow.factory.closed
        self.assertEqual((yield closed), 4008)
        lattice = provider.lattice
        self.assertFalse(lattice.has_subscribers("flood"))
        self.assertFalse(lattice.has_subscribers(slow.address))
        self.assertFalse(lattice.has_subscribers(slow.address + ".r1"))
        self.assertEqual(provider.ws.stats.sessions_closed, 1)

    @defer.inlineCallbacks
    def test_no_owed_reply_for_a_message_that_was_not_delivered(self):
        """A message too large for the session is not delivered, so its reply_to grants nothing."""
        provider = yield start_provider(self, {"MAX_MESSAGE_SIZE": "1024", "PUBLISH_DENY": "svc.>"},
                                        handlers=[("echo", echo, {"SUBSCRIPTIONS": "svc.>"})])
        peer = yield self.raw_peer(provider)
        with self.assertRaises(MessagingError) as cm:
            yield provider.publish(BrokerMessage(peer.welcome["reply_to"], b"x" * 2000, "svc.answer"))
        self.assertEqual(cm.exception.code, "too_large")
        peer.transport.write(frame(json.dumps({"subject": "svc.answer", "body": "sneak", "id": 1}).encode()))
        (_, payload), = (yield peer.wait_frames(2))[1:]
        answer = json.loads(payload)
        self.assertEqual((answer["type"], answer.get("code")), ("error", "permission_denied"))

    @defer.inlineCallbacks
    def test_deeply_nested_json_is_bad_json_and_the_session_survives(self):
        provider = yield start_provider(self, handlers=[("echo", echo, {"SUBSCRIPTIONS": "echo.>"})])
        peer = yield self.raw_peer(provider)
        nested = b'{"subject":"echo.x","body":' + b"[" * 30000 + b"]" * 30000 + b"}"
        peer.transport.write(frame(nested) + frame(json.dumps({"subject": "echo.x", "body": "after"}).encode()))
        got = yield peer.wait_frames(3)
        error, echoed = (json.loads(p) for _, p in got[1:])
        self.assertEqual((error["type"], error["code"]), ("error", "bad_json"))
        self.assertEqual(echoed["body"], "after")
