"""Review findings on the server side, each pinned by a test (raw frames where the wire matters)."""

import json
import struct

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from wsprovider import BrokerMessage, MessagingError, NotConnected
from wsprovider.handlers import echo

from .peers import AutobahnPeer, start_provider, ws_url
from .test_fastframes import RawPeer, frame


class ReviewServerTests(unittest.TestCase):
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
