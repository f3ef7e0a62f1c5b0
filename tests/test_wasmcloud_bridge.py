"""End to end with a real wasmCloud 2.x host: nats-server + ``wash dev`` running the tiny
WAT echo component (``tests/wasmcloud/echo.wat``) + wsprovider on the same NATS + real
WebSocket peers. The component uses plain ``wasmcloud:messaging@0.2.0`` ``publish`` and
``handle-message``; it knows nothing about WebSocket."""

import time

from twisted.internet import defer
from twisted.trial import unittest

from wsprovider import BrokerMessage

from .natsserver import NatsServer
from .test_nats_lattice import connect, start_nats_provider
from .wasmhost import WasmCloudDevHost


class WasmCloudBridgeTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.nats = NatsServer(self)
        yield self.nats.start()
        self.host = WasmCloudDevHost(self.nats.url, subscriptions=["wc.echo", "wc.app.>"])
        self.addCleanup(self.host.stop)
        yield self.host.start()
        self.provider = yield start_nats_provider(self, self.nats.url)

    @defer.inlineCallbacks
    def test_peer_message_gets_component_echo_on_same_session(self):
        peer = yield connect(self.provider)
        other = yield connect(self.provider)
        started = time.monotonic()
        yield peer.send_json({"subject": "wc.echo", "body": "hello"})
        frame = yield peer.recv_json()
        self.echo_ms = (time.monotonic() - started) * 1000
        self.assertEqual(frame, {"type": "message", "subject": peer.address, "body": "echo: hello"})
        # Binary bodies are byte-exact through the component.
        yield other.send_json({"subject": "wc.app.bin", "body_base64": "AAEC/w=="})
        frame = yield other.recv_json()
        self.assertEqual(frame["subject"], other.address)
        self.assertEqual(frame["body_base64"], "ZWNobzogAAEC/w==")  # b"echo: \x00\x01\x02\xff"
        yield peer.close()
        yield other.close()

    @defer.inlineCallbacks
    def test_peer_request_gets_reply_frame(self):
        peer = yield connect(self.provider)
        yield peer.send_json({"type": "request", "id": 7, "subject": "wc.echo", "body": "ping",
                              "timeout_ms": 10000})
        reply = yield peer.recv_json()
        self.assertEqual((reply["type"], reply["id"], reply["body"]), ("reply", 7, "echo: ping"))
        self.assertTrue(reply["subject"].startswith("_INBOX.wsp-"))
        # A request to a subject no component serves: no_responders, as wasmCloud reports it too.
        yield peer.send_json({"type": "request", "id": 8, "subject": "wc.nobody", "body": "x"})
        err = yield peer.recv_json()
        self.assertEqual((err["type"], err["code"], err["id"]), ("error", "no_responders", 8))
        yield peer.close()

    @defer.inlineCallbacks
    def test_component_publishes_to_another_session_address(self):
        sender = yield connect(self.provider)
        target = yield connect(self.provider)
        # "to:<subject>:<text>" makes the component publish <text> to <subject> first,
        # then echo to the reply_to.
        yield sender.send_json({"subject": "wc.echo", "body": f"to:{target.address}:hi from wasm"})
        frame = yield target.recv_json()
        self.assertEqual(frame, {"type": "message", "subject": target.address, "body": "hi from wasm"})
        echo = yield sender.recv_json()
        self.assertEqual(echo["body"], f"echo: to:{target.address}:hi from wasm")
        yield sender.close()
        yield target.close()

    @defer.inlineCallbacks
    def test_python_side_reaches_component_and_session(self):
        peer = yield connect(self.provider)
        # The service's own consumer (what a Python component uses) talks to the wasm component.
        reply = yield self.provider.request("wc.echo", b"from python", 10000)
        self.assertEqual(reply.body, b"echo: from python")
        # Ask the component to publish to the session's address below it.
        yield self.provider.publish(BrokerMessage("wc.echo", f"to:{peer.address}.push:pushed".encode()))
        frame = yield peer.recv_json()
        self.assertEqual(frame, {"type": "message", "subject": peer.address + ".push", "body": "pushed"})
        yield peer.close()
