"""Wasmcloud1Lattice and RemoteComponent (wsprovider.wasmcloud1.lattice), without sockets.

The wRPC client is replaced by a recorder that answers with a chosen value: the real
client is tested against nats-server in test_wasmcloud1_wrpc and end to end in
test_wasmcloud1_host; here only the mapping of results to the messaging contract is checked.
"""

from twisted.internet import defer, task
from twisted.trial import unittest

from wsprovider.interfaces import (
    IClusteredLattice, IConnectionState, IExactBroadcastCount, ILattice, IMessageHandler, ISynchronousDispatch,
)
from wsprovider.message import BrokerMessage, MessagingError, NoResponders
from wsprovider.wasmcloud1 import messaging as m
from wsprovider.wasmcloud1.lattice import Wasmcloud1Lattice
from wsprovider.wasmcloud1.values import Err, Ok, decode
from wsprovider.wasmcloud1.wrpc import WrpcTrap


class RecordingWrpc:
    def __init__(self, answer):
        self.answer = answer
        self.calls = []

    def invoke(self, prefix, instance, function, params, results_type, headers=None):
        self.calls.append((prefix, instance, function, params, headers))
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


class StateNats:
    def __init__(self):
        self.is_connected = True
        self.listeners = []

    def on_state_change(self, listener):
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)


class LatticeTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()

    def test_declared_capabilities(self):
        lattice = Wasmcloud1Lattice(self.clock)
        self.assertTrue(ILattice.providedBy(lattice))
        self.assertTrue(IConnectionState.providedBy(lattice))
        self.assertTrue(IExactBroadcastCount.providedBy(lattice))
        self.assertFalse(IClusteredLattice.providedBy(lattice))
        # Sessions and linked components share an in-process bus: delivery is synchronous.
        self.assertTrue(ISynchronousDispatch.providedBy(lattice))

    def test_bus_publish_subscribe_request(self):
        lattice = Wasmcloud1Lattice(self.clock)
        got = []
        lattice.subscribe("chat.*", got.append)
        lattice.publish(BrokerMessage("chat.x", b"1"))
        self.assertEqual(got, [BrokerMessage("chat.x", b"1")])
        self.failureResultOf(lattice.publish(BrokerMessage("nobody", b"")), NoResponders)
        lattice.subscribe("svc", lambda msg: lattice.publish(BrokerMessage(msg.reply_to, b"pong")))
        reply = self.successResultOf(lattice.request("svc", b"ping", 1000))
        self.assertEqual(reply.body, b"pong")

    def test_connection_state_follows_nats(self):
        nats = StateNats()
        lattice = Wasmcloud1Lattice(self.clock, nats=nats)
        states = []
        lattice.add_state_listener(states.append)
        nats.is_connected = False
        nats.listeners[0]("connected", "reconnecting")
        self.assertEqual((lattice.connected, states), (False, [False]))
        lattice.close()
        self.assertEqual(nats.listeners, [])

    def test_component_without_wrpc_is_refused(self):
        self.assertRaises(MessagingError, Wasmcloud1Lattice(self.clock).component, "comp-a")


class RemoteComponentTests(unittest.TestCase):
    def component(self, answer):
        self.wrpc = RecordingWrpc(answer)
        return Wasmcloud1Lattice(task.Clock(), "default", "wsprovider", self.wrpc).component("comp-a")

    def test_invocation(self):
        component = self.component(Ok())
        self.assertTrue(IMessageHandler.providedBy(component))
        self.assertIsNone(self.successResultOf(component.handle_message(BrokerMessage("a.b", b"hi", "r.1"))))
        prefix, instance, function, params, headers = self.wrpc.calls[0]
        self.assertEqual((prefix, instance, function), ("default.comp-a", m.HANDLER, "handle-message"))
        self.assertEqual(decode(m.HANDLE_MESSAGE_PARAMS, params), (BrokerMessage("a.b", b"hi", "r.1"),))
        self.assertEqual(headers, {"source-id": "wsprovider", "target-id": "comp-a"})

    def test_err_value_is_a_messaging_error(self):
        error = self.failureResultOf(self.component(Err("boom")).handle_message(BrokerMessage("a", b""))).value
        self.assertIsInstance(error, MessagingError)
        self.assertIn("boom", str(error))

    def test_trap_is_a_messaging_error(self):
        failure = self.failureResultOf(self.component(WrpcTrap("trapped")).handle_message(BrokerMessage("a", b"")))
        self.assertIsInstance(failure.value, MessagingError)
