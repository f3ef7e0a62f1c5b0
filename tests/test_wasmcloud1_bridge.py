"""How links map onto WebSocket servers and connections (wsprovider.wasmcloud1.bridge),
with real providers on loopback ports."""

from twisted.internet import defer, reactor
from twisted.trial import unittest
from zope.interface import implementer

from tests.peers import WebsocketsPeer
from wsprovider.config import ProviderConfig
from wsprovider.interfaces import IMessageHandler
from wsprovider.message import BrokerMessage
from wsprovider.wasmcloud1.bridge import WebSocketSide
from wsprovider.wasmcloud1.lattice import Wasmcloud1Lattice

SERVER = {"MODE": "server", "URI": "tcp:0:interface=127.0.0.1"}


@implementer(IMessageHandler)
class Recorder:
    def __init__(self):
        self.messages = defer.DeferredQueue()

    def handle_message(self, msg):
        self.messages.put(msg)


class GroupingTests(unittest.TestCase):
    timeout = 30

    def side(self):
        side = WebSocketSide(lambda: Wasmcloud1Lattice(reactor), reactor)
        self.addCleanup(side.stop)
        return side

    @defer.inlineCallbacks
    def test_identical_settings_share_one_server(self):
        side = self.side()
        recorder = Recorder()
        yield side.link_target("comp-a", ProviderConfig.from_mapping(SERVER))
        yield side.link_source("comp-a", ProviderConfig.from_mapping(dict(SERVER, SUBSCRIPTIONS="chat.>")), recorder)
        self.assertEqual(len(side.groups), 1)
        (group,) = side.groups.values()
        peer = yield WebsocketsPeer.connect(f"ws://127.0.0.1:{group.provider.port}/ws")
        self.addCleanup(peer.close)
        yield peer.send_json({"subject": "chat.one", "body": "x"})
        msg = yield recorder.messages.get()
        self.assertEqual(msg, BrokerMessage("chat.one", b"x", peer.address))
        yield side.consumer_for("comp-a").publish(BrokerMessage(peer.address, b"back"))
        frame = yield peer.recv_type("message")
        self.assertEqual(frame["body"], "back")

    @defer.inlineCallbacks
    def test_different_settings_get_their_own_and_the_last_delete_closes(self):
        side = self.side()
        yield side.link_target("comp-a", ProviderConfig.from_mapping(SERVER))
        yield side.link_target("comp-b", ProviderConfig.from_mapping(dict(SERVER, MAX_MESSAGE_SIZE="2048")))
        self.assertEqual(len(side.groups), 2)
        ports = sorted(g.provider.port for g in side.groups.values())
        self.assertTrue((yield side.unlink("target", "comp-a")))
        self.assertFalse((yield side.unlink("target", "comp-a")))  # unknown now: harmless
        self.assertEqual(len(side.groups), 1)
        yield side.unlink("target", "comp-b")
        self.assertEqual(side.groups, {})
        for port in ports:
            yield self.assertFailure(WebsocketsPeer.connect(f"ws://127.0.0.1:{port}/ws"), OSError)

    @defer.inlineCallbacks
    def test_client_mode_is_one_connection_per_component(self):
        side = self.side()
        client = ProviderConfig.from_mapping({"MODE": "client", "URI": "ws://127.0.0.1:9/none",
                                              "RECONNECT_MIN_SEC": "5"})
        yield side.link_target("comp-a", client)
        yield side.link_source("comp-a", client, Recorder())
        yield side.link_target("comp-b", client)
        self.assertEqual(sorted(sorted(g.owners) for g in side.groups.values()),
                         [[("source", "comp-a"), ("target", "comp-a")], [("target", "comp-b")]])
