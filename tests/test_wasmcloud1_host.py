"""wsprovider-wasmcloud end to end, started by the fake 1.x host (tests/wasmcloud1host.py)
as a subprocess with a cleared environment and HostData on stdin, on a real nats-server,
with WebSocket peers from the ``websockets`` library on the other side.
"""

import json

from twisted.internet import defer
from twisted.trial import unittest

from tests.natsserver import free_port
from tests.peers import WebsocketsPeer
from tests.wasmcloud1host import FakeHost, consumer_link, handler_link, start_nats
from wsprovider.message import BrokerMessage
from wsprovider.wasmcloud1.values import Err, Ok
from wsprovider.wasmcloud1.wrpc import WrpcTrap

PROVIDER = "wsprovider-test"


class ServerModeTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.nats_server = yield start_nats(self)
        self.ws_port = free_port()
        self.handler = handler_link("comp-a", PROVIDER, {"SUBSCRIPTIONS": "chat.>"})
        self.consumer = consumer_link("comp-a", PROVIDER)
        self.host = FakeHost(self, self.nats_server.url, PROVIDER,
                             config={"MODE": "server", "URI": f"127.0.0.1:{self.ws_port}"},
                             links=[self.consumer])
        yield self.host.connect()
        self.component = yield self.host.serve_component("comp-a")
        self.proc = self.host.start_provider()
        health = yield self.host.wait_healthy()
        self.assertEqual(health, {"healthy": True, "message": "healthy"})
        yield self.host.put_link(self.handler)  # a live put, on the xkey subject and the legacy one

    @defer.inlineCallbacks
    def peer(self):
        for _ in range(100):  # the listener comes up when the first link of its group is put
            try:
                peer = yield WebsocketsPeer.connect(f"ws://127.0.0.1:{self.ws_port}/ws")
            except OSError:
                yield self.host.nats.flush()
                continue
            self.addCleanup(peer.close)
            return peer
        self.fail(f"the WebSocket server did not come up:\n{self.host.output()}")

    @defer.inlineCallbacks
    def test_done_when_server_mode(self):
        peer = yield self.peer()
        # a peer's message reaches the linked handler, reply_to = the session's address
        yield peer.send_json({"subject": "chat.room", "body": "hello"})
        msg = yield self.component.messages.get()
        self.assertEqual(msg, BrokerMessage("chat.room", b"hello", peer.address))
        headers = self.component.received[0][1]
        self.assertEqual(headers, {"source-id": PROVIDER, "target-id": "comp-a"})
        # the component's consumer.publish to that reply_to reaches the peer
        result = yield self.host.publish_as("comp-a", BrokerMessage(msg.reply_to, b"hi there"))
        self.assertEqual(result, Ok())
        frame = yield peer.recv_type("message")
        self.assertEqual((frame["subject"], frame["body"]), (peer.address, "hi there"))
        # consumer.request to the session gets the peer's answer
        answer = self.host.request_as("comp-a", peer.address, b"question?", 5000)
        request = yield peer.recv_type("message")
        self.assertEqual(request["body"], "question?")
        yield peer.send_json({"subject": request["reply_to"], "body": "answer!"})
        result = yield answer
        self.assertIsInstance(result, Ok)
        self.assertEqual(result.value.body, b"answer!")
        # an unlinked caller is refused the way the SDKs do: the invocation traps
        yield self.assertFailure(self.host.publish_as("comp-z", BrokerMessage(peer.address, b"x")), WrpcTrap)
        # deleting the handler link stops delivery: the peer's next message reaches no one
        yield self.host.delete_link(self.handler)
        yield self.host.proc.wait_for(b"link deleted: handler")
        yield self.host.delete_link(self.handler)  # twice: harmless
        yield peer.send_json({"type": "message", "id": 7, "subject": "chat.room", "body": "after"})
        frame = yield peer.recv_type("error")
        self.assertEqual(frame["code"], "no_responders")
        self.assertEqual(len(self.component.received), 1)
        # shutdown: answered within the host's 300 ms, sessions closed with 1001, clean exit
        reply, elapsed = yield self.host.shutdown()  # fails if not answered within the host's 300 ms
        self.assertEqual(reply, b"shutting down")
        self.measured_shutdown_reply_sec = elapsed
        code, _reason = yield peer.wait_closed()
        self.assertEqual(code, 1001)
        status = yield self.proc.ended.addTimeout(5, _reactor())
        self.assertEqual(status, 0, self.host.output())

    @defer.inlineCallbacks
    def test_other_hosts_shutdown_is_ignored_and_put_is_idempotent(self):
        yield self.host.put_link(self.handler)
        yield self.host.put_link(self.handler)
        peer = yield self.peer()
        yield peer.send_json({"subject": "chat.x", "body": "one"})
        yield self.component.messages.get()
        yield self.assertFailure(self.host.shutdown(host_id="NSOMEOTHERHOST"), Exception)
        health = yield self.host.wait_healthy()
        self.assertTrue(health["healthy"])
        self.assertEqual(len(self.component.received), 1)  # one delivery despite three puts
        reply, _ = yield self.host.shutdown()
        self.assertEqual(reply, b"shutting down")
        yield self.proc.ended.addTimeout(5, _reactor())


def _reactor():
    from twisted.internet import reactor
    return reactor
