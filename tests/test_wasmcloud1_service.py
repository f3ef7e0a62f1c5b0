"""Wasmcloud1Provider in-process on a real nats-server, driven by the fake host's NATS side:
control-interface details the end-to-end test does not cover."""

import json

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.natsserver import free_port
from tests.peers import WebsocketsPeer
from tests.wasmcloud1host import FakeHost, consumer_link, handler_link, start_nats
from wsprovider.message import BrokerMessage
from wsprovider.wasmcloud1.hostdata import parse_host_data
from wsprovider.wasmcloud1.service import Wasmcloud1Provider
from wsprovider.wasmcloud1.values import Err, Ok
from wsprovider.wasmcloud1.wrpc import WrpcTrap

P = "wsprovider-test"


class LogCapture:
    def __init__(self, testcase):
        from twisted.logger import formatEvent
        self.format = formatEvent
        self.lines = []
        self._waiters = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        line = self.format(event)
        self.lines.append(line)
        for text, d in list(self._waiters):
            if text in line:
                self._waiters.remove((text, d))
                d.callback(line)

    def wait_for(self, text, timeout=10):
        for line in self.lines:
            if text in line:
                return defer.succeed(line)
        d = defer.Deferred()
        self._waiters.append((text, d))
        return d.addTimeout(timeout, reactor)


class ServiceTestCase(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, config=None, links=(), secrets=None, xkeys_enabled=True):
        self.nats_server = yield start_nats(self)
        self.logs = LogCapture(self)
        self.host = FakeHost(self, self.nats_server.url, P, config=config, links=links, secrets=secrets,
                             xkeys_enabled=xkeys_enabled)
        yield self.host.connect()
        self.exited = []
        self.provider = Wasmcloud1Provider(parse_host_data(self.host.host_data), reactor,
                                           on_exit=lambda: self.exited.append(True))
        self.provider.startService()
        self.addCleanup(self.provider.stopService)
        yield self.provider.ready
        return self.provider


class ControlTests(ServiceTestCase):
    @defer.inlineCallbacks
    def test_host_before_1_1_puts_links_on_the_provider_id(self):
        yield self.start(xkeys_enabled=False)
        self.assertEqual(self.provider.control.subjects["link_put"], [f"wasmbus.rpc.default.{P}.linkdefs.put"])
        yield self.host.put_link(consumer_link("comp-a", P, {"URI": "tcp:0:interface=127.0.0.1"}))
        yield self.logs.wait_for("link put: consumer")
        self.assertIsNotNone(self.provider.side.consumer_for("comp-a"))

    @defer.inlineCallbacks
    def test_bad_link_config_is_refused_clearly(self):
        yield self.start()
        yield self.host.put_link(consumer_link("comp-a", P, {"MODE": "sideways"}))
        line = yield self.logs.wait_for("refused")
        self.assertIn("MODE", line)
        self.assertIn("accepted values: server, client", line)
        yield self.assertFailure(self.host.publish_as("comp-a", BrokerMessage("x", b"")), WrpcTrap)
        self.assertEqual(len(self.provider.links), 0)

    @defer.inlineCallbacks
    def test_malformed_control_messages_are_dropped(self):
        yield self.start()
        yield self.host.nats.publish(self.host.rpc("linkdefs.put", self.host.link_put_key), b"{not json")
        yield self.host.nats.publish(self.host.rpc("linkdefs.del"), json.dumps({"source_id": 3}).encode())
        yield self.host.nats.publish(self.host.rpc("config.update"), b"[1, 2]")
        health = yield self.host.wait_healthy()
        self.assertTrue(health["healthy"])

    @defer.inlineCallbacks
    def test_config_update_applies_to_links_put_afterwards(self):
        yield self.start(config={"MAX_MESSAGE_SIZE": "1000"})
        self.assertEqual(self.provider.base_config.max_message_size, 1000)
        yield self.host.nats.publish(self.host.rpc("config.update"), json.dumps({"MAX_MESSAGE_SIZE": "2000"}).encode())
        yield self.logs.wait_for("provider config updated")
        self.assertEqual(self.provider.base_config.max_message_size, 2000)

    @defer.inlineCallbacks
    def test_shutdown_reply_then_exit(self):
        yield self.start()
        reply, elapsed = yield self.host.shutdown()
        self.assertEqual(reply, b"shutting down")
        yield self.provider.exited
        self.assertEqual(self.exited, [True])


class ConsumerTests(ServiceTestCase):
    @defer.inlineCallbacks
    def test_errors_are_err_values_not_traps(self):
        port = free_port()
        yield self.start(config={"URI": f"127.0.0.1:{port}"}, links=[consumer_link("comp-a", P)])
        result = yield self.host.publish_as("comp-a", BrokerMessage("nobody.here", b"x"))
        self.assertIsInstance(result, Err)
        self.assertIn("no subscriber", result.value)
        result = yield self.host.request_as("comp-a", "nobody.here", b"x", 200)
        self.assertIsInstance(result, Err)
        self.assertIn("no responders", result.value)

    @defer.inlineCallbacks
    def test_params_over_max_payload_are_reassembled(self):
        """A 1 MB body does not fit one NATS message (max_payload 1 MiB with subject, reply and
        headers): the invocation carries part, .params the rest; the value decodes whole and
        the session's own size limit answers, as an err value naming a size of at least the body."""
        port = free_port()
        yield self.start(config={"URI": f"127.0.0.1:{port}"}, links=[consumer_link("comp-a", P)])
        yield self.logs.wait_for("ready")
        peer = yield WebsocketsPeer.connect(f"ws://127.0.0.1:{port}/ws")
        self.addCleanup(peer.close)
        result = yield self.host.request_as("comp-a", peer.address, b"b" * 1048000, 5000)
        self.assertIsInstance(result, Err)
        import re
        self.assertGreaterEqual(max(int(n) for n in re.findall(r"\d+", result.value)), 1048000, result.value)

    @defer.inlineCallbacks
    def test_host_secret_auth_token_guards_the_server(self):
        port = free_port()
        yield self.start(config={"URI": f"127.0.0.1:{port}"}, links=[consumer_link("comp-a", P)],
                         secrets={"AUTH_TOKEN": {"kind": "String", "value": "host-secret"}})
        yield self.logs.wait_for("ready")
        url = f"ws://127.0.0.1:{port}/ws"
        import websockets
        yield self.assertFailure(WebsocketsPeer.connect(url), websockets.InvalidStatus)
        peer = yield WebsocketsPeer.connect(url, additional_headers={"Authorization": "Bearer host-secret"})
        self.addCleanup(peer.close)
        self.assertNotIn("host-secret", "\n".join(self.logs.lines))
        # and the handler's err value reaches the peer as an error frame
        component = yield self.host.serve_component("comp-a")
        component.answer = Err("boom")
        yield self.host.put_link(handler_link("comp-a", P, {"SUBSCRIPTIONS": "in.>"}))
        yield self.logs.wait_for("link put: handler")
        yield peer.send_json({"type": "message", "id": 1, "subject": "in.x", "body": "hi"})
        frame = yield peer.recv_type("error")
        self.assertIn("boom", frame["message"])
        result = yield self.host.publish_as("comp-a", BrokerMessage(peer.address, b"to you"))
        self.assertEqual(result, Ok())
