"""wsprovider-wasmcloud end to end, started by the fake 1.x host (tests/wasmcloud1host.py)
as a subprocess with a cleared environment and HostData on stdin, on a real nats-server,
with WebSocket peers from the ``websockets`` library on the other side.
"""

import asyncio

from twisted.internet import defer
from twisted.trial import unittest

from tests.natsserver import free_port
from tests.peers import WebsocketsPeer
from tests.wasmcloud1host import FakeHost, consumer_link, handler_link, start_nats
from wsprovider.message import BrokerMessage
from wsprovider.wasmcloud1.values import Err, Ok
from wsprovider.wasmcloud1.wrpc import WrpcTrap

PROVIDER = "wsprovider-test"


class ServerModeTestCase(unittest.TestCase):
    """Provider config MODE=server on a free port; comp-a linked both ways."""

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
        yield self.host.proc.wait_for(b"link put: handler")

    @defer.inlineCallbacks
    def peer(self):
        yield self.host.proc.wait_for(b"WebSocket server for")  # the group's listener is up
        peer = yield WebsocketsPeer.connect(f"ws://127.0.0.1:{self.ws_port}/ws")
        self.addCleanup(peer.close)
        return peer


class ServerModeTests(ServerModeTestCase):

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


class SignalTests(ServerModeTestCase):
    """SIGTERM (an operator, or a host stopping without a shutdown request) drains as shutdown does."""

    @defer.inlineCallbacks
    def test_sigterm_closes_sessions_with_1001_and_exits_cleanly(self):
        peer = yield self.peer()
        self.host.process.signalProcess("TERM")
        code, _reason = yield peer.wait_closed()
        self.assertEqual(code, 1001)
        status = yield self.proc.ended.addTimeout(5, _reactor())
        self.assertEqual(status, 0, self.host.output())


class WsServer:
    """An independent WebSocket server (``websockets``) that answers "question" with "answer"."""

    def __init__(self):
        self.received = defer.DeferredQueue()
        self.opened = defer.DeferredQueue()
        self.closed = defer.DeferredQueue()
        self.connections = []
        self.server = None

    @defer.inlineCallbacks
    def start(self, testcase):
        self.server = yield defer.Deferred.fromFuture(asyncio.ensure_future(self._serve()))
        testcase.addCleanup(self.stop)
        self.url = f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/feed"
        return self

    async def _serve(self):
        from websockets.asyncio.server import serve
        return await serve(self._handler, "127.0.0.1", 0)

    async def _handler(self, ws):
        import websockets
        self.connections.append(ws)
        self.opened.put(ws)
        try:
            async for message in ws:
                self.received.put(message)
                if message == "question":
                    await ws.send("answer")
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.put((ws.close_code, ws))

    def send_all(self, data):
        return defer.gatherResults([defer.Deferred.fromFuture(asyncio.ensure_future(ws.send(data)))
                                    for ws in self.connections])

    def stop(self):
        self.server.close()
        return defer.Deferred.fromFuture(asyncio.ensure_future(self.server.wait_closed()))


class ClientModeTests(unittest.TestCase):
    """Link config MODE=client, URI=ws://... against a ``websockets`` server; the token
    comes as an xkey-sealed link secret."""

    timeout = 90

    @defer.inlineCallbacks
    def test_done_when_client_mode(self):
        nats_server = yield start_nats(self)
        ws = yield WsServer().start(self)
        host = FakeHost(self, nats_server.url, PROVIDER)
        settings = {"MODE": "client", "URI": ws.url, "RECONNECT_MIN_SEC": "0.05", "RECONNECT_MAX_SEC": "0.2"}
        secret = host.seal_for_provider({"AUTH_TOKEN": "s3cret-token"})
        handler = handler_link("comp-a", PROVIDER, dict(settings), secrets=secret)
        consumer = consumer_link("comp-a", PROVIDER, dict(settings), secrets=secret)
        host.host_data["link_definitions"] = [consumer, handler]
        yield host.connect()
        component = yield host.serve_component("comp-a")
        proc = host.start_provider()
        yield host.wait_healthy()
        conn = yield ws.opened.get()
        self.assertEqual(conn.request.headers.get("Authorization"), "Bearer s3cret-token")
        self.assertNotIn("s3cret-token", host.output())  # secrets are never logged
        # the server's message reaches the handler, reply_to = the link's address
        yield proc.wait_for(b"link put: handler")
        yield ws.send_all("hello")
        msg = yield component.messages.get()
        self.assertEqual((msg.subject, msg.body), ("message", b"hello"))
        # the component's consumer.publish to that reply_to goes out over the link
        result = yield host.publish_as("comp-a", BrokerMessage(msg.reply_to, b"hi server"))
        self.assertEqual(result, Ok())
        self.assertEqual((yield ws.received.get()), "hi server")
        # consumer.request resolves with the server's answer
        result = yield host.request_as("comp-a", "anything", b"question", 5000)
        self.assertEqual((yield ws.received.get()), "question")
        self.assertIsInstance(result, Ok)
        self.assertEqual(result.value.body, b"answer")
        self.assertEqual(len(ws.connections), 1)  # both links of comp-a share one connection
        # deleting the handler link stops delivery; the consumer link keeps the connection
        yield host.delete_link(handler)
        yield proc.wait_for(b"link deleted: handler")
        yield ws.send_all("nobody hears this")
        yield host.request_as("comp-a", "anything", b"question", 5000)  # ordered after it on the link
        self.assertEqual(len(component.received), 1)
        # shutdown: answered within 300 ms, the link closes with 1001, clean exit
        reply, _ = yield host.shutdown()
        self.assertEqual(reply, b"shutting down")
        code, _conn = yield ws.closed.get()
        # client.ClientLinks.stop() closes its links with 1000 today (main); 1001 once it takes a code
        self.assertIn(code, (1000, 1001))
        status = yield proc.ended.addTimeout(5, _reactor())
        self.assertEqual(status, 0, host.output())


class TwistdTests(unittest.TestCase):
    """The same wiring by hand: ``twistd -n wsprovider --wasmcloud-host-data -``."""

    timeout = 90

    @defer.inlineCallbacks
    def test_twistd_runs_the_provider_and_stops_on_shutdown(self):
        import sys
        from tests.wasmcloud1host import REPO_ROOT
        nats_server = yield start_nats(self)
        host = FakeHost(self, nats_server.url, PROVIDER, config={"URI": f"127.0.0.1:{free_port()}"},
                        links=[consumer_link("comp-a", PROVIDER)])
        yield host.connect()
        twistd = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; "
                  "sys.argv[0] = 'twistd'; run()", "-n", "--pidfile=", "wsprovider", "--wasmcloud-host-data", "-"]
        proc = host.start_provider(env={"PYTHONPATH": REPO_ROOT}, argv=twistd)
        health = yield host.wait_healthy()
        self.assertTrue(health["healthy"])
        result = yield host.publish_as("comp-a", BrokerMessage("nobody", b"x"))
        self.assertIsInstance(result, Err)  # linked, served; nobody subscribes to "nobody"
        reply, _ = yield host.shutdown()
        self.assertEqual(reply, b"shutting down")
        status = yield proc.ended.addTimeout(10, _reactor())
        self.assertEqual(status, 0, host.output())


def _reactor():
    from twisted.internet import reactor
    return reactor
