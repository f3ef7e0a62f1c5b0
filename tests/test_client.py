"""Client mode end to end: links to an independent ``websockets`` server and to our own server mode.

Run under ``trial --reactor=asyncio``: the ``websockets`` server lives on the reactor's loop.
Nothing sleeps to synchronise; ``wait_for`` polls a condition under a bounded deadline.
"""

import json
import re
import os
import socket
import sys
from http import HTTPStatus

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from wsprovider import WebSocketMessagingProvider
from wsprovider.client import full_jitter
from wsprovider.config import ConfigError, ProviderConfig
from wsprovider.interfaces import IMessageHandler
from wsprovider.message import BrokerMessage, BufferFull, NoResponders, NotConnected, RequestTimeout

from .peers import WebsocketsPeer, as_deferred, start_provider, ws_url
from .test_twistd import TWISTD, twistd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small backoff so that reconnects happen within a test's time.
FAST = {"RECONNECT_MIN_SEC": "0.02", "RECONNECT_MAX_SEC": "0.1", "CONNECT_TIMEOUT_SEC": "3"}


@defer.inlineCallbacks
def wait_for(predicate, what, timeout=8.0):
    """Poll ``predicate`` until it is true, failing after ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        yield task.deferLater(reactor, 0.01, lambda: None)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@implementer(IMessageHandler)
class Recorder:
    def __init__(self):
        self.received = []
        self.queue = defer.DeferredQueue()

    def handle_message(self, msg):
        self.received.append(msg)
        self.queue.put(msg)

    def next(self):
        return self.queue.get()


@implementer(IMessageHandler)
class ReplyOn:
    """Answers messages whose subject starts with ``prefix`` on their ``reply_to``: 're: <body>'."""

    def __init__(self, consumer, prefix):
        self.consumer = consumer
        self.prefix = prefix

    def handle_message(self, msg):
        if msg.subject.startswith(self.prefix) and msg.reply_to:
            return self.consumer.publish(BrokerMessage(msg.reply_to, b"re: " + msg.body))


class WsServer:
    """An independent WebSocket server (the ``websockets`` library) on 127.0.0.1.

    ``envelope``: accept the wsprovider.v1.json subprotocol and send a welcome frame.
    ``token``: require ``Authorization: Bearer <token>`` (else HTTP 401).
    ``echo``: send every message back. ``greeting``: sent to each new connection.
    """

    def __init__(self, envelope=False, token=None, echo=False, greeting=None, port=0):
        self.envelope = envelope
        self.token = token
        self.echo = echo
        self.greeting = greeting
        self.port = port
        self.received = defer.DeferredQueue()
        self.connections = []
        self.opened = defer.DeferredQueue()
        self.closed = defer.DeferredQueue()
        self.requests = []
        self.server = None

    @defer.inlineCallbacks
    def start(self):
        kwargs = {}
        if self.envelope:
            kwargs["subprotocols"] = ["wsprovider.v1.json"]
        self.server = yield as_deferred(_serve(self._handler, "127.0.0.1", self.port,
                                               process_request=self._check, **kwargs))
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self):
        return f"ws://127.0.0.1:{self.port}/feed"

    def _check(self, connection, request):
        self.requests.append(request)
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return connection.respond(HTTPStatus.UNAUTHORIZED, "bad token\n")
        return None

    async def _handler(self, ws):
        import websockets
        self.connections.append(ws)
        self.opened.put(ws)
        try:
            if self.envelope:
                await ws.send(json.dumps({"type": "welcome", "session_id": "s1", "reply_to": "srv.s1",
                                          "protocol": "wsprovider.v1.json"}))
            if self.greeting is not None:
                await ws.send(self.greeting)
            async for message in ws:
                self.received.put(message)
                if self.echo:
                    await ws.send(message)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.put(ws)

    def send_all(self, data):
        return defer.gatherResults([as_deferred(ws.send(data)) for ws in self.connections
                                    if ws.state.name == "OPEN"])

    @defer.inlineCallbacks
    def stop(self):
        if self.server is not None:
            server, self.server = self.server, None
            server.close()
            yield as_deferred(server.wait_closed())


async def _serve(*args, **kwargs):
    from websockets.asyncio.server import serve
    return await serve(*args, **kwargs)  # serve() wants a running loop: build it inside the coroutine


async def _close(server):
    server.close()
    await server.wait_closed()


@defer.inlineCallbacks
def start_server(testcase, **kwargs):
    server = WsServer(**kwargs)
    yield server.start()
    testcase.addCleanup(server.stop)
    return server


@defer.inlineCallbacks
def start_client(testcase, uri, config=None, handlers=(), lattice=None):
    """A client-mode provider linked to ``uri``; shut down at cleanup."""
    values = {"MODE": "client", "URI": uri}
    values.update(FAST)
    values.update(config or {})
    provider = WebSocketMessagingProvider(ProviderConfig.from_mapping(values), lattice=lattice)
    provider.startService()
    testcase.addCleanup(provider.shutdown)
    yield provider.when_ready()
    for component_id, handler, link_config in handlers:
        yield provider.receive_link_config_as_source(component_id, link_config, handler=handler)
    return provider


def only_link(provider):
    sessions = provider.list_sessions()
    assert len(sessions) == 1, sessions
    return sessions[0]


def connected(provider):
    return wait_for(lambda: only_link(provider)["state"] == "connected", "the link to connect")


class CaptureLog:
    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self):
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events]


# -- against an ordinary WebSocket server (raw frames) ------------------------------------

class RawModeTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_exchange_both_ways(self):
        server = yield start_server(self)
        recorder = Recorder()
        provider = yield start_client(self, server.url, handlers=[("recorder", recorder, None)])
        consumer = provider.receive_link_config_as_target("consumer")
        yield connected(provider)
        link = only_link(provider)
        self.assertEqual(link["mode"], "client")
        self.assertEqual(link["wire_mode"], "raw")
        self.assertIsNone(link["subprotocol"])  # auto offered the envelope; the server declined
        self.assertEqual(link["uri"], server.url)

        # component -> server: text stays text, bytes that are not UTF-8 go as a binary frame
        yield consumer.publish(BrokerMessage("anything", "héllo".encode()))
        self.assertEqual((yield server.received.get()), "héllo")
        yield consumer.publish(BrokerMessage("anything", b"\xff\x00"))
        self.assertEqual((yield server.received.get()), b"\xff\x00")

        # server -> every handler, reply_to = the link's address
        yield server.send_all("from server")
        msg = yield recorder.next()
        self.assertEqual(msg, BrokerMessage("message", b"from server", link["address"]))
        self.assertEqual(link["address"], "_ws.session." + link["session_id"])
        yield server.send_all(b"\x01\x02")
        msg = yield recorder.next()
        self.assertEqual((msg.subject, msg.body), ("binary.message", b"\x01\x02"))

        # a handler answers through the link: publish to reply_to, or send_to_session
        yield provider.publish(BrokerMessage(msg.reply_to, b"answer 1"))
        self.assertEqual((yield server.received.get()), "answer 1")
        yield provider.send_to_session(link["session_id"], BrokerMessage("whatever", b"answer 2"))
        self.assertEqual((yield server.received.get()), "answer 2")

    @defer.inlineCallbacks
    def test_every_handler_receives(self):
        server = yield start_server(self)
        one, two = Recorder(), Recorder()
        provider = yield start_client(self, server.url, handlers=[("h1", one, None), ("h2", two, None)])
        yield connected(provider)
        yield server.send_all("news")
        self.assertEqual((yield one.next()).body, b"news")
        self.assertEqual((yield two.next()).body, b"news")

    @defer.inlineCallbacks
    def test_handler_reply_reaches_server(self):
        server = yield start_server(self, greeting="ping")
        provider = yield start_client(self, server.url, handlers=[
            ("replier", lambda consumer: ReplyOn(consumer, "message"), None)])
        yield connected(provider)
        self.assertEqual((yield server.received.get()), "re: ping")

    @defer.inlineCallbacks
    def test_request_against_echo_server(self):
        server = yield start_server(self, echo=True)
        provider = yield start_client(self, server.url, {"WIRE_MODE": "raw"})
        yield connected(provider)
        reply = yield provider.request("ignored.in.raw.mode", b"ping", 2000)
        self.assertEqual((reply.subject, reply.body), ("message", b"ping"))
        self.assertEqual(only_link(provider)["pending_requests"], 0)
        self.assertEqual(server.requests[0].headers.get("Sec-WebSocket-Protocol"), None)  # raw offers none

    @defer.inlineCallbacks
    def test_raw_request_times_out(self):
        server = yield start_server(self)  # never answers
        provider = yield start_client(self, server.url)
        yield connected(provider)
        d = provider.request("q", b"anyone?", 100)
        yield self.assertFailure(d, RequestTimeout)
        self.assertEqual(only_link(provider)["pending_requests"], 0)

    @defer.inlineCallbacks
    def test_headers_and_token_on_the_upgrade(self):
        server = yield start_server(self, token="s3cret")
        provider = yield start_client(self, server.url, {"AUTH_TOKEN": "s3cret", "HEADER_X-Tenant": "acme"})
        yield connected(provider)
        headers = server.requests[-1].headers
        self.assertEqual(headers["Authorization"], "Bearer s3cret")
        self.assertEqual(headers["X-Tenant"], "acme")
        self.assertEqual(headers["Sec-WebSocket-Protocol"], "wsprovider.v1.json")  # auto offers it
        self.assertTrue(headers["User-Agent"].startswith("wsprovider/"))

    @defer.inlineCallbacks
    def test_explicit_authorization_header_wins(self):
        server = yield start_server(self, token="right")
        provider = yield start_client(self, server.url, {"AUTH_TOKEN": "wrong",
                                                         "HEADER_Authorization": "Bearer right"})
        yield connected(provider)
        self.assertEqual(server.requests[-1].headers.get_all("Authorization"), ["Bearer right"])

    @defer.inlineCallbacks
    def test_wrong_token_is_reported_and_retried(self):
        log = CaptureLog(self)
        server = yield start_server(self, token="right")
        provider = yield start_client(self, server.url, {"AUTH_TOKEN": "wrong"})
        yield wait_for(lambda: len(server.requests) >= 3, "three attempts")
        link = only_link(provider)
        self.assertIn(link["state"], ("connecting", "backing_off"))
        self.assertIn("HTTP 401", link["last_error"])
        self.assertIn("AUTH_TOKEN", link["last_error"])
        self.assertGreaterEqual(link["attempts"], 2)
        self.assertEqual(link["connects"], 0)
        texts = log.texts()
        self.assertTrue(any("HTTP 401" in t for t in texts), texts)
        self.assertTrue(any("backing off, retrying in" in t for t in texts), texts)

    @defer.inlineCallbacks
    def test_server_that_drops_every_connection_gets_backoff(self):
        """Accepting the upgrade and hanging up at once must not reset the backoff each time."""
        log = CaptureLog(self)
        opened = []

        async def hang_up(ws):
            opened.append(ws)  # returning closes the connection (1000) right after the upgrade

        server = yield as_deferred(_serve(hang_up, "127.0.0.1", 0))
        self.addCleanup(lambda: as_deferred(_close(server)))
        port = server.sockets[0].getsockname()[1]
        yield start_client(self, f"ws://127.0.0.1:{port}/", {"WIRE_MODE": "raw"})
        yield wait_for(lambda: len(opened) >= 4, "four short-lived connections")
        counts = [int(m.group(1)) for m in (re.search(r"\((\d+) failed attempt", t) for t in log.texts()) if m]
        self.assertGreaterEqual(max(counts), 3, counts)

    @defer.inlineCallbacks
    def test_connect_timeout_covers_the_handshake(self):
        """A listener that accepts TCP but never answers the upgrade: each attempt ends at the timeout."""
        accepted = defer.DeferredQueue()
        lost = defer.DeferredQueue()

        class Silent(protocol.Protocol):
            def connectionMade(self):
                self.at = reactor.seconds()
                accepted.put(self)

            def connectionLost(self, reason):
                lost.put(reactor.seconds() - self.at)

        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Silent))
        self.addCleanup(port.stopListening)
        provider = yield start_client(self, f"ws://127.0.0.1:{port.getHost().port}/",
                                      {"CONNECT_TIMEOUT_SEC": "0.3"})
        yield accepted.get()
        held = yield lost.get()
        self.assertGreaterEqual(held, 0.25)
        self.assertLess(held, 2.0)
        yield accepted.get()  # and it tries again
        link = only_link(provider)
        self.assertIn("timed out", link["last_error"])
        self.assertIn("CONNECT_TIMEOUT_SEC=0.3s", link["last_error"])

    @defer.inlineCallbacks
    def test_restart_reconnects_and_flushes_buffer_in_order(self):
        server = yield start_server(self)
        provider = yield start_client(self, server.url)
        yield connected(provider)
        port = server.port
        yield server.stop()
        yield wait_for(lambda: only_link(provider)["state"] != "connected", "the link to notice")
        for i in range(5):
            yield provider.publish(BrokerMessage("queued", f"m{i}".encode()))
        link = only_link(provider)
        self.assertEqual(link["buffered_messages"], 5)
        self.assertIsNotNone(link["last_error"])
        restarted = yield start_server(self, port=port)
        got = []
        for _ in range(5):
            got.append((yield restarted.received.get()))
        self.assertEqual(got, [f"m{i}" for i in range(5)])
        link = only_link(provider)
        self.assertEqual(link["state"], "connected")
        self.assertEqual(link["connects"], 2)
        self.assertEqual(link["buffered_messages"], 0)

    @defer.inlineCallbacks
    def test_buffer_full_is_a_clear_error(self):
        provider = yield start_client(self, f"ws://127.0.0.1:{free_port()}/", {"OFFLINE_BUFFER_BYTES": "1000"})
        accepted = 0
        while True:
            try:
                yield provider.publish(BrokerMessage("s", b"x" * 99))  # 100 bytes with the subject
            except BufferFull as e:
                error = e
                break
            accepted += 1
        self.assertEqual(accepted, 10)
        self.assertEqual(error.code, "buffer_full")
        self.assertIn("OFFLINE_BUFFER_BYTES=1000", str(error))
        self.assertIn("not accepted", str(error))
        yield self.assertFailure(provider.request("s", b"y", 1000), BufferFull)
        self.assertEqual(only_link(provider)["buffered_messages"], 10)

    @defer.inlineCallbacks
    def test_server_that_stops_reading_fills_the_buffer_not_memory(self):
        stalled = []

        async def never_reads(ws):
            stalled.append(ws)
            await ws.wait_closed()  # never recv(): with max_queue=1 it stops reading the socket

        server = yield as_deferred(_serve(never_reads, "127.0.0.1", 0, max_queue=1))
        self.addCleanup(lambda: as_deferred(_close(server)))
        provider = yield start_client(self, f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/",
                                      {"OFFLINE_BUFFER_BYTES": "1048576"})
        yield connected(provider)
        chunk = b"x" * 65536
        sent = 0
        with self.assertRaises(BufferFull) as e:
            while sent < 4000:  # 256 MiB: far more than socket buffers hold
                yield provider.publish(BrokerMessage("bulk", chunk))
                sent += 1
        self.assertIn("not reading fast enough", str(e.exception))
        link = only_link(provider)
        self.assertEqual(link["state"], "connected")
        self.assertLessEqual(link["buffered_bytes"], 1048576)

    @defer.inlineCallbacks
    def test_gives_up_after_max_attempts(self):
        provider = yield start_client(self, f"ws://127.0.0.1:{free_port()}/", {"RECONNECT_MAX_ATTEMPTS": "2"})
        yield wait_for(lambda: only_link(provider)["state"] == "failed", "the link to give up")
        link = only_link(provider)
        self.assertEqual(link["attempts"], 2)
        self.assertIn("cannot connect", link["last_error"])
        yield self.assertFailure(provider.publish(BrokerMessage("s", b"x")), NotConnected)

    @defer.inlineCallbacks
    def test_envelope_required_but_not_offered_by_server(self):
        server = yield start_server(self)
        provider = yield start_client(self, server.url, {"WIRE_MODE": "envelope"})
        yield wait_for(lambda: len(server.requests) >= 2, "a retry")
        self.assertIn("WIRE_MODE=envelope", only_link(provider)["last_error"])

    @defer.inlineCallbacks
    def test_disconnect_drops_and_the_link_comes_back(self):
        server = yield start_server(self)
        provider = yield start_client(self, server.url)
        yield connected(provider)
        link_id = only_link(provider)["session_id"]
        self.assertTrue((yield provider.disconnect_session(link_id)))
        yield wait_for(lambda: only_link(provider)["connects"] == 2 and only_link(provider)["state"] == "connected",
                       "the second connection")
        self.assertFalse((yield provider.disconnect_session("nope")))


class EnvelopeWithIndependentServerTests(unittest.TestCase):
    """auto mode picks the envelope when the server accepts the subprotocol."""

    timeout = 20

    @defer.inlineCallbacks
    def test_envelope_frames_and_reply_to_kept(self):
        server = yield start_server(self, envelope=True)
        recorder = Recorder()
        provider = yield start_client(self, server.url, handlers=[
            ("recorder", recorder, None), ("replier", lambda c: ReplyOn(c, "ask."), None)])
        yield connected(provider)
        link = only_link(provider)
        self.assertEqual((link["wire_mode"], link["subprotocol"]), ("envelope", "wsprovider.v1.json"))
        self.assertEqual((link["remote_session_id"], link["remote_reply_to"]), ("s1", "srv.s1"))

        yield provider.publish(BrokerMessage("chat.room", b"\xffbin"))
        frame = json.loads((yield server.received.get()))
        self.assertEqual(frame, {"type": "message", "subject": "chat.room", "body_base64": "/2Jpbg=="})

        # the server's own reply_to is kept, and a handler's answer to it goes back over the link
        yield server.send_all(json.dumps({"subject": "ask.time", "body": "now?", "reply_to": "peer.7.inbox"}))
        msg = yield recorder.next()
        self.assertEqual(msg, BrokerMessage("ask.time", b"now?", "peer.7.inbox"))
        frame = json.loads((yield server.received.get()))
        self.assertEqual(frame, {"type": "message", "subject": "peer.7.inbox", "body": "re: now?"})

        # without reply_to: the link's address; a message to the server's address for us is 'message'
        yield server.send_all(json.dumps({"subject": "srv.s1", "body": "direct"}))
        msg = yield recorder.next()
        self.assertEqual(msg, BrokerMessage("message", b"direct", link["address"]))

        # a component's reply_to travels as a subject under the link's address at the server
        got = Recorder()
        yield provider.lattice.subscribe("replies.here", got.handle_message)
        yield provider.publish(BrokerMessage("ask.other", b"?", "replies.here"))
        frame = json.loads((yield server.received.get()))
        self.assertTrue(frame["reply_to"].startswith("srv.s1._r."), frame)
        yield server.send_all(json.dumps({"subject": frame["reply_to"], "body": "!"}))
        self.assertEqual((yield got.next()).body, b"!")

    @defer.inlineCallbacks
    def test_outbound_subjects_forward_lattice_traffic_without_echo(self):
        server = yield start_server(self, envelope=True)
        recorder = Recorder()
        provider = yield start_client(self, server.url, {"OUTBOUND_SUBJECTS": "out.>"},
                                      handlers=[("recorder", recorder, {"SUBSCRIPTIONS": "out.loop"})])
        link = yield provider.ws.link_for().when_connected()
        self.assertEqual(link.state, "connected")
        yield provider.lattice.publish(BrokerMessage("out.first", b"1"))  # any lattice publisher
        self.assertEqual(json.loads((yield server.received.get()))["subject"], "out.first")
        # what the server sends on a forwarded subject reaches handlers but is not sent back
        yield server.send_all(json.dumps({"subject": "out.loop", "body": "x"}))
        self.assertEqual((yield recorder.next()).subject, "out.loop")
        yield provider.lattice.publish(BrokerMessage("out.second", b"2"))
        self.assertEqual(json.loads((yield server.received.get()))["subject"], "out.second")


# -- against our own server mode (envelope) ------------------------------------------------

@implementer(IMessageHandler)
class Silent:
    def handle_message(self, msg):
        return None


class OwnServerTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.remote_recorder = Recorder()
        self.server = yield start_provider(self, handlers=[
            ("svc", lambda c: ReplyOn(c, "svc.echo"), {"SUBSCRIPTIONS": "svc.>"}),
            ("slow", Silent(), {"SUBSCRIPTIONS": "slow.>"}),
            ("remote-recorder", self.remote_recorder, {"SUBSCRIPTIONS": "up.>"}),
        ])
        self.recorder = Recorder()
        self.client = yield start_client(self, ws_url(self.server), {"REMOTE_SUBSCRIPTIONS": "news.>"}, handlers=[
            ("recorder", self.recorder, None),
            ("replier", lambda c: ReplyOn(c, "news."), None),
        ])
        yield connected(self.client)
        yield wait_for(lambda: self.server.list_sessions() and self.server.list_sessions()[0]["subscriptions"],
                       "the remote subscription")

    def test_link_is_a_session_there(self):
        link = only_link(self.client)
        self.assertEqual(link["wire_mode"], "envelope")
        [remote] = self.server.list_sessions()
        self.assertEqual(remote["session_id"], link["remote_session_id"])
        self.assertEqual(remote["subscriptions"], ["news.>"])
        self.assertTrue(self.server.ws.sessions[remote["session_id"]].http_headers["user-agent"]
                        .startswith("wsprovider/"))

    @defer.inlineCallbacks
    def test_publish_reaches_remote_components(self):
        yield self.client.publish(BrokerMessage("up.data", b"\x00\x01"))
        msg = yield self.remote_recorder.next()
        self.assertEqual(msg.subject, "up.data")
        self.assertEqual(msg.body, b"\x00\x01")
        self.assertEqual(msg.reply_to, only_link(self.client)["remote_reply_to"])

    @defer.inlineCallbacks
    def test_request_reply_through_a_remote_handler(self):
        reply = yield self.client.request("svc.echo", b"hi", 3000)
        self.assertEqual(reply.body, b"re: hi")
        self.assertEqual(only_link(self.client)["pending_requests"], 0)

    @defer.inlineCallbacks
    def test_request_timeout_cleans_up(self):
        yield self.assertFailure(self.client.request("slow.op", b"x", 150), RequestTimeout)
        self.assertEqual(only_link(self.client)["pending_requests"], 0)

    @defer.inlineCallbacks
    def test_request_to_nobody_fails_fast(self):
        e = yield self.assertFailure(self.client.request("nobody.here", b"x", 10000), NoResponders)
        self.assertIn("nobody.here", str(e))
        self.assertEqual(only_link(self.client)["pending_requests"], 0)

    @defer.inlineCallbacks
    def test_remote_peer_message_reaches_handlers_and_their_reply_gets_back(self):
        peer = yield WebsocketsPeer.connect(ws_url(self.server))
        self.addCleanup(peer.close)
        yield peer.send_json({"subject": "news.today", "body": "extra!"})
        msg = yield self.recorder.next()
        self.assertEqual((msg.subject, msg.body, msg.reply_to), ("news.today", b"extra!", peer.address))
        reply = yield peer.recv_type("message")
        self.assertEqual((reply["subject"], reply["body"]), (peer.address, "re: extra!"))

    @defer.inlineCallbacks
    def test_remote_broadcast_reaches_handlers(self):
        yield self.server.broadcast_to_clients(BrokerMessage("alert", b"all"))
        msg = yield self.recorder.next()
        self.assertEqual((msg.subject, msg.body), ("alert", b"all"))

    @defer.inlineCallbacks
    def test_request_fails_when_the_link_is_lost(self):
        d = self.client.request("slow.op", b"x", 10000)
        [remote] = self.server.list_sessions()
        yield self.server.disconnect_session(remote["session_id"], 1000, "bye")
        e = yield self.assertFailure(d, NotConnected)
        self.assertIn("lost before the reply", str(e))
        yield connected(self.client)  # and it comes back


class OwnServerAuthTests(unittest.TestCase):
    """AUTH_TOKEN on both ends: our client's bearer token against our server's check."""

    timeout = 20

    @defer.inlineCallbacks
    def test_token_accepted_and_wrong_token_reported(self):
        server = yield start_provider(self, {"AUTH_TOKEN": "t0ken"})
        good = yield start_client(self, ws_url(server), {"AUTH_TOKEN": "t0ken"})
        yield connected(good)
        self.assertEqual(only_link(good)["wire_mode"], "envelope")
        bad = yield start_client(self, ws_url(server), {"AUTH_TOKEN": "nope"})
        yield wait_for(lambda: only_link(bad)["attempts"] >= 2 and only_link(bad)["last_error"], "a retry")
        self.assertIn("HTTP 401", only_link(bad)["last_error"])
        self.assertEqual(len(server.list_sessions()), 1)


# -- links: sharing, deleting, config -------------------------------------------------------

class LinkTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_links_share_equal_connections_and_delete_closes_only_theirs(self):
        a = yield start_server(self)
        b = yield start_server(self)
        provider = yield start_client(self, a.url)
        provider.receive_link_config_as_target("same", {})                 # shares the provider's link
        consumer_b = provider.receive_link_config_as_target("to-b", {"URI": b.url})
        provider.receive_link_config_as_target("to-b-too", {"URI": b.url})
        yield wait_for(lambda: len(provider.list_sessions()) == 2 and
                       all(s["state"] == "connected" for s in provider.list_sessions()), "two links")
        by_uri = {s["uri"]: s for s in provider.list_sessions()}
        self.assertEqual(by_uri[a.url]["links"], ["provider", "target:same"])
        self.assertEqual(by_uri[b.url]["links"], ["target:to-b", "target:to-b-too"])
        self.assertEqual((len(a.connections), len(b.connections)), (1, 1))

        yield consumer_b.publish(BrokerMessage("x", b"to b"))
        self.assertEqual((yield b.received.get()), "to b")
        yield provider.publish(BrokerMessage("x", b"to a"))
        self.assertEqual((yield a.received.get()), "to a")

        provider.delete_link_as_target("to-b")
        self.assertEqual(len(provider.list_sessions()), 2)  # still used by to-b-too
        provider.delete_link_as_target("to-b-too")
        yield b.closed.get()
        self.assertEqual([s["uri"] for s in provider.list_sessions()], [a.url])
        self.assertEqual(len(a.connections), 1)

    @defer.inlineCallbacks
    def test_source_link_with_its_own_uri(self):
        b = yield start_server(self)
        recorder = Recorder()
        provider = WebSocketMessagingProvider.from_config({"MODE": "client", **FAST})  # no provider URI
        provider.startService()
        self.addCleanup(provider.shutdown)
        yield provider.when_ready()
        self.assertEqual(provider.list_sessions(), [])
        yield provider.receive_link_config_as_source("h", {"URI": b.url}, handler=recorder)
        yield connected(provider)
        yield b.send_all("hello")
        self.assertEqual((yield recorder.next()).body, b"hello")
        yield provider.delete_link_as_source("h")
        yield b.closed.get()
        self.assertEqual(provider.list_sessions(), [])

    @defer.inlineCallbacks
    def test_links_made_before_start(self):
        b = yield start_server(self)
        provider = WebSocketMessagingProvider.from_config({"MODE": "client", **FAST})
        consumer = provider.receive_link_config_as_target("c", {"URI": b.url})
        provider.startService()
        self.addCleanup(provider.shutdown)
        yield provider.when_ready()
        yield consumer.publish(BrokerMessage("x", b"early"))  # buffered until connected
        self.assertEqual((yield b.received.get()), "early")

    def test_config_errors(self):
        with self.assertRaises(ConfigError) as e:
            WebSocketMessagingProvider.from_config({"MODE": "client", "URI": "http://example.com"})
        self.assertIn("ws://", str(e.exception))
        with self.assertRaises(ConfigError):
            ProviderConfig.from_mapping({"WIRE_MODE": "json"})
        provider = WebSocketMessagingProvider.from_config({"MODE": "client", **FAST})
        provider.startService()
        self.addCleanup(provider.shutdown)
        with self.assertRaises(ConfigError) as e:
            provider.receive_link_config_as_target("c", {})
        self.assertIn("URI", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            provider.receive_link_config_as_target("c", {"URI": "ws://h/", "CA_BUNDLE": "/nonexistent.pem"})
        self.assertIn("CA_BUNDLE", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            provider.receive_link_config_as_target("c", {"URI": "wss://h/", "CA_BUNDLE": "/nonexistent.pem"})
        self.assertIn("cannot read", str(e.exception))
        with self.assertRaises(ConfigError) as e:
            provider.receive_link_config_as_target("c", {"URI": "ws://h/", "RECONNECT_MIN_SEC": "5",
                                                         "RECONNECT_MAX_SEC": "1"})
        self.assertIn("RECONNECT_MIN_SEC", str(e.exception))
        with self.assertRaises(ConfigError):
            provider.receive_link_config_as_target("c", {"URI": "ws://h/", "HEADER_X-Bad": "a\r\nb"})

    def test_full_jitter_is_bounded_and_grows(self):
        self.assertEqual(full_jitter(1, 0.5, 30, rnd=lambda: 1.0), 0.5)
        self.assertEqual(full_jitter(4, 0.5, 30, rnd=lambda: 1.0), 4.0)
        self.assertEqual(full_jitter(100, 0.5, 30, rnd=lambda: 1.0), 30)
        self.assertEqual(full_jitter(5, 0.5, 30, rnd=lambda: 0.0), 0.0)


class DocsTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_client_mode_doc_example_runs(self):
        """The client-mode Python example of README.rst (the seed's), run against a real server."""
        import re
        with open(os.path.join(ROOT, "README.rst")) as f:
            text = f.read()
        text = text[text.index("\nClient mode\n"):]
        block = re.search(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text).group(1)
        code = "\n".join(line[4:] for line in block.splitlines())
        namespace = {"__name__": "docs_example"}
        exec(compile(code, "docs/client-mode.rst", "exec"), namespace)
        server = yield start_server(self, greeting="hello handlers")
        handler_1, handler_2 = yield namespace["main"](reactor, uri=server.url, linger=0)
        self.assertEqual((yield server.received.get()), "hello server")
        self.assertEqual((yield server.received.get()), "Response payload")


# -- TLS -----------------------------------------------------------------------------------

def make_ca_and_server_cert(directory):
    """A throwaway CA and a server certificate for localhost/127.0.0.1; returns (ca.pem, cert.pem, key.pem)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wsprovider test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = [os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem")]
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return paths


class TlsTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        import ssl

        directory = self.mktemp()
        os.makedirs(directory)
        self.ca, cert, key = make_ca_and_server_cert(directory)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.received = defer.DeferredQueue()

        async def handler(ws):
            async for message in ws:
                self.received.put(message)

        self.server = yield as_deferred(_serve(handler, "127.0.0.1", 0, ssl=context))
        self.port = self.server.sockets[0].getsockname()[1]

    @defer.inlineCallbacks
    def tearDown(self):
        self.server.close()
        yield as_deferred(self.server.wait_closed())

    @defer.inlineCallbacks
    def test_wss_with_ca_bundle(self):
        provider = yield start_client(self, f"wss://localhost:{self.port}/", {"CA_BUNDLE": self.ca})
        yield connected(provider)
        yield provider.publish(BrokerMessage("s", b"over tls"))
        self.assertEqual((yield self.received.get()), "over tls")

    @defer.inlineCallbacks
    def test_wss_unknown_ca_is_refused_not_silently_accepted(self):
        provider = yield start_client(self, f"wss://localhost:{self.port}/")
        yield wait_for(lambda: only_link(provider)["attempts"] >= 2 or only_link(provider)["state"] == "backing_off"
                       and only_link(provider)["last_error"], "a failed attempt")
        link = only_link(provider)
        self.assertNotEqual(link["state"], "connected")
        self.assertEqual(link["connects"], 0)
        self.assertRegex(link["last_error"].lower(), "certificate|verify|tls|ssl")


# -- twistd ----------------------------------------------------------------------------------

class TwistdClientTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_client_mode_usage_errors(self):
        cases = [
            (["--mode=client"], "--uri (URI): client mode needs the WebSocket URL"),
            (["--mode=client", "--uri=http://example.com/"], "is not a WebSocket URL"),
            (["--mode=client", "--uri=ws://example.com/", "--wire-mode=json"], "--wire-mode (WIRE_MODE)"),
            (["--mode=client", "--uri=ws://example.com/", "--reconnect-max-attempts=-1"], "out of range"),
        ]
        for args, expected in cases:
            out, err, code = yield twistd("-n", "--pidfile=", "wsprovider", *args)
            text = (out + err).decode()
            self.assertNotEqual(code, 0, args)
            self.assertIn(expected, text, args)
            self.assertNotIn("Traceback", text, args)

    @defer.inlineCallbacks
    def test_twistd_client_with_handler(self):
        """twistd -n wsprovider --mode=client --uri ... --handler echo: the server's message comes back."""
        server = yield start_server(self)
        ended = defer.Deferred()

        class Watch(protocol.ProcessProtocol):
            output = b""

            def outReceived(self, data):
                self.output += data

            errReceived = outReceived

            def processEnded(self, reason):
                ended.callback(self.output)

        watch = Watch()
        args = TWISTD + ["-n", "--pidfile=", "wsprovider", "--mode=client", "--uri", server.url,
                         "--handler", "wsprovider.handlers:echo", "--header", "X-From=twistd"]
        process = reactor.spawnProcess(watch, sys.executable, [sys.executable] + args,
                                       env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT)

        def stop():
            if not ended.called:
                process.signalProcess("TERM")
            return ended
        self.addCleanup(stop)
        ws = yield server.opened.get()
        self.assertEqual(ws.request.headers["X-From"], "twistd")
        yield as_deferred(ws.send("echo me"))
        self.assertEqual((yield server.received.get()), "echo me")
        process.signalProcess("TERM")
        output = (yield ended).decode()
        self.assertIn("connected (raw frames)", output)
        self.assertNotIn("Traceback", output)


# -- loops, attempt counts, echo suppression on NATS -------------------------------------------

class LoopProtectionTests(unittest.TestCase):
    """The documented ``echo`` handler against a server that echoes must not bounce forever."""

    timeout = 30

    @defer.inlineCallbacks
    def test_echo_handler_against_echo_server_is_cut(self):
        from wsprovider.handlers import echo
        log = CaptureLog(self)
        server = yield start_server(self, echo=True, greeting="hello")
        provider = yield start_client(self, server.url, {"MAX_REPLY_HOPS": "8"}, handlers=[("echo", echo, None)])
        yield wait_for(lambda: only_link(provider)["loops_cut"] >= 1, "the loop to be cut")
        link = only_link(provider)
        self.assertEqual(link["messages_out"], 8)
        self.assertEqual(len(server.received.pending), 8)
        warnings = [t for t in log.texts() if "loop cut" in t]
        self.assertEqual(len(warnings), 1, warnings)
        self.assertIn("MAX_REPLY_HOPS=8", warnings[0])
        # and it stays cut: a request/echo round trip later, nothing else went out
        reply = yield provider.request("x", b"ping", 3000)
        self.assertEqual(reply.body, b"ping")
        self.assertEqual((only_link(provider)["messages_out"], only_link(provider)["loops_cut"]), (9, 1))

    @defer.inlineCallbacks
    def test_twistd_echo_against_echo_server_is_cut(self):
        """The issue's reproduction: twistd -n wsprovider --mode=client --handler wsprovider.handlers:echo."""
        server = yield start_server(self, echo=True, greeting="hello")
        watch = _Watch()
        args = TWISTD + ["-n", "--pidfile=", "wsprovider", "--mode=client", "--uri", server.url,
                         "--handler", "wsprovider.handlers:echo"]
        process = reactor.spawnProcess(watch, sys.executable, [sys.executable] + args,
                                       env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT)
        self.addCleanup(watch.stop, process)
        yield wait_for(lambda: b"loop cut" in watch.output, "the loop-cut warning", timeout=20)
        self.assertEqual(len(server.received.pending), 8)
        process.signalProcess("TERM")
        output = (yield watch.ended).decode()
        self.assertIn("MAX_REPLY_HOPS=8", output)
        self.assertIn("wsprovider.handlers:echo", output)
        self.assertNotIn("Traceback", output)


class _Watch(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.ended.callback(self.output)

    def stop(self, process):
        if not self.ended.called:
            process.signalProcess("TERM")
        return self.ended


class AttemptCountTests(unittest.TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def test_reconnect_logs_show_one_consistent_attempt_count(self):
        log = CaptureLog(self)
        provider = yield start_client(self, f"ws://127.0.0.1:{free_port()}/", {"RECONNECT_MAX_ATTEMPTS": "4"})
        yield wait_for(lambda: only_link(provider)["state"] == "failed", "the link to give up")
        texts = [t for t in log.texts() if "client link" in t]
        connecting = [int(m.group(1)) for m in (re.search(r"connecting \(attempt (\d+)\)", t) for t in texts) if m]
        failed = [(int(m.group(1)), int(m.group(2)) if m.group(2) else None)
                  for m in (re.search(r"attempt (\d+) failed: .*?(?:\((\d+) failed attempt|giving up)", t)
                            for t in texts) if m]
        self.assertEqual(connecting, [1, 2, 3, 4])
        self.assertEqual([n for n, _ in failed], [1, 2, 3, 4])
        self.assertTrue(all(in_a_row in (None, n) for n, in_a_row in failed), failed)
        self.assertIn("giving up after 4 failed attempts", texts[-1])
        self.assertEqual(only_link(provider)["attempts"], 4)
        self.assertFalse([t for t in log.texts() if "Scheduling retry" in t])   # no second counter

    @defer.inlineCallbacks
    def test_short_lived_connections_keep_counting(self):
        log = CaptureLog(self)
        opened = []

        async def hang_up(ws):
            opened.append(ws)

        server = yield as_deferred(_serve(hang_up, "127.0.0.1", 0))
        self.addCleanup(lambda: as_deferred(_close(server)))
        port = server.sockets[0].getsockname()[1]
        yield start_client(self, f"ws://127.0.0.1:{port}/", {"WIRE_MODE": "raw"})
        yield wait_for(lambda: len(opened) >= 3, "three short-lived connections")
        texts = [t for t in log.texts() if "client link" in t]
        connecting = [int(m.group(1)) for m in (re.search(r"connecting \(attempt (\d+)\)", t) for t in texts) if m]
        connected = [int(m.group(1)) for m in (re.search(r"connected \(raw frames\) at attempt (\d+)", t)
                                               for t in texts) if m]
        self.assertEqual(connecting[:3], [1, 2, 3])
        self.assertEqual(connected[:2], [1, 2])


class NatsEchoSuppressionTests(unittest.TestCase):
    """OUTBOUND_SUBJECTS on a NATS lattice: the server's message comes back from NATS as a copy."""

    timeout = 30

    @defer.inlineCallbacks
    def test_server_message_is_not_forwarded_back_over_nats(self):
        from .natsserver import NatsServer
        nats = NatsServer(self)
        yield nats.start()
        server = yield start_server(self, envelope=True)
        recorder = Recorder()
        provider = yield start_client(self, server.url, {"NATS_URL": nats.url, "OUTBOUND_SUBJECTS": "out.>"},
                                      handlers=[("recorder", recorder, {"SUBSCRIPTIONS": "out.loop"})])
        yield provider.lattice.when_connected()
        yield provider.ws.link_for().when_connected()
        yield provider.lattice.publish(BrokerMessage("out.first", b"1"))
        self.assertEqual(json.loads((yield server.received.get()))["subject"], "out.first")
        yield server.send_all(json.dumps({"subject": "out.loop", "body": "x"}))
        self.assertEqual((yield recorder.next()).subject, "out.loop")   # went through NATS and back
        yield provider.lattice.publish(BrokerMessage("out.second", b"2"))
        self.assertEqual(json.loads((yield server.received.get()))["subject"], "out.second")
        self.assertEqual(only_link(provider)["messages_out"], 2)
