"""wRPC over NATS (wsprovider.wasmcloud1.wrpc) against a real nats-server.

Our server and client talk to each other, and each is also driven by hand-written wire
sequences that follow the captures (tests/wasmcloud1_captures/) message by message: a
caller with a per-call ``_INBOX.<nuid>`` inbox as the Go library has, and the results
stream a Go server sends, so neither side is only checked against itself.
"""

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.natsserver import NatsServer
from wsprovider.message import BrokerMessage
from wsprovider.nats import connect
from wsprovider.wasmcloud1 import messaging as m
from wsprovider.wasmcloud1 import values as v
from wsprovider.wasmcloud1.wrpc import (
    Inbox, WrpcClient, WrpcNoResponders, WrpcServer, WrpcTimeout, WrpcTrap, invocation_subject,
)

PREFIX = "default.peer-provider"
PUBLISH = invocation_subject(PREFIX, m.CONSUMER, "publish")


class Recorder:
    """Records every message on a subject pattern, fires ``until(n)`` when it has n."""

    def __init__(self):
        self.messages = []
        self._waiters = []

    def __call__(self, msg):
        self.messages.append(msg)
        for n, d in list(self._waiters):
            if len(self.messages) >= n:
                self._waiters.remove((n, d))
                d.callback(self.messages)

    def until(self, n, timeout=10):
        if len(self.messages) >= n:
            return defer.succeed(self.messages)
        d = defer.Deferred()
        self._waiters.append((n, d))
        return d.addTimeout(timeout, reactor)


class WrpcTestCase(unittest.TestCase):
    timeout = 60
    server_config = ""

    @defer.inlineCallbacks
    def setUp(self):
        self.nats_server = NatsServer(self, config=self.server_config)
        yield self.nats_server.start()

    @defer.inlineCallbacks
    def nats(self):
        client = yield connect(self.nats_server.url, name=self.id().rsplit(".", 1)[-1])
        self.addCleanup(client.close)
        return client

    @defer.inlineCallbacks
    def endpoint(self):
        nats = yield self.nats()
        inbox = yield Inbox(nats).start()
        return nats, inbox

    @defer.inlineCallbacks
    def serve_publish(self, handler):
        nats, inbox = yield self.endpoint()
        server = WrpcServer(nats, inbox, reactor, params_timeout=5)
        yield server.serve(PREFIX, m.CONSUMER, "publish", m.PUBLISH_PARAMS, m.PUBLISH_RESULTS, handler, queue=PREFIX)
        self.addCleanup(server.stop)
        return server


class ServerWireTests(WrpcTestCase):
    """Our server, driven by the caller's side of the captured sequence."""

    @defer.inlineCallbacks
    def call_by_hand(self, params: bytes, headers, split_at=None):
        seen = []

        def handler(params, invocation):
            seen.append((params, invocation.headers))
            return v.Ok()
        yield self.serve_publish(handler)
        caller = yield self.nats()
        inbox = "_INBOX.xWR9OZIaush3LsjiB3bBVh"  # the Go library's per-call shape
        recorder = Recorder()
        yield caller.subscribe(inbox, recorder)
        yield caller.subscribe(inbox + ".results", recorder)
        first = params if split_at is None else params[:split_at]
        yield caller.publish(PUBLISH, first, inbox, headers)
        (handshake,) = yield recorder.until(1)
        self.assertEqual(handshake.subject, inbox)
        self.assertEqual(handshake.data, b"")
        self.assertIsNone(handshake.headers)
        if split_at is not None:
            yield caller.publish(handshake.reply + ".params", params[split_at:])
        yield caller.publish(handshake.reply + ".params", b"")
        messages = yield recorder.until(3)
        return seen, messages

    @defer.inlineCallbacks
    def test_capture_1_publish(self):
        seen, messages = yield self.call_by_hand(bytes.fromhex("03612e620268690" + "0"),
                                                 {"source-id": "comp-ok", "link-name": "default"})
        self.assertEqual(seen, [((BrokerMessage("a.b", b"hi"),), {"source-id": "comp-ok", "link-name": "default"})])
        self.assertEqual([(msg.subject, msg.data) for msg in messages[1:]],
                         [("_INBOX.xWR9OZIaush3LsjiB3bBVh.results", b"\x00"),
                          ("_INBOX.xWR9OZIaush3LsjiB3bBVh.results", b"")])

    @defer.inlineCallbacks
    def test_params_split_across_invocation_and_params_chunk(self):
        params = m.PUBLISH_PARAMS.encode((BrokerMessage("big.subject", bytes(range(200)) * 5),))
        seen, messages = yield self.call_by_hand(params, None, split_at=7)
        self.assertEqual(seen[0][0][0].body, bytes(range(200)) * 5)
        self.assertEqual(messages[1].data, b"\x00")

    @defer.inlineCallbacks
    def test_trap_is_the_empty_results_message_only(self):
        def handler(params, invocation):
            raise ValueError("the handler broke")
        yield self.serve_publish(handler)
        caller = yield self.nats()
        recorder = Recorder()
        yield caller.subscribe("_INBOX.t.>", recorder)
        yield caller.subscribe("_INBOX.t", recorder)
        yield caller.publish(PUBLISH, bytes.fromhex("01780179" + "00"), "_INBOX.t")
        (handshake,) = yield recorder.until(1)
        yield caller.publish(handshake.reply + ".params", b"")
        messages = yield recorder.until(2)
        self.assertEqual([(msg.subject, msg.data) for msg in messages[1:]], [("_INBOX.t.results", b"")])
        self.flushLoggedErrors(ValueError)

    @defer.inlineCallbacks
    def test_params_eof_before_a_complete_value_is_a_trap(self):
        yield self.serve_publish(lambda params, invocation: v.Ok())
        caller = yield self.nats()
        recorder = Recorder()
        yield caller.subscribe("_INBOX.u.>", recorder)
        yield caller.subscribe("_INBOX.u", recorder)
        yield caller.publish(PUBLISH, bytes.fromhex("0378"), "_INBOX.u")  # a subject cut short
        (handshake,) = yield recorder.until(1)
        yield caller.publish(handshake.reply + ".params", b"")
        messages = yield recorder.until(2)
        self.assertEqual(messages[1].data, b"")


class ClientWireTests(WrpcTestCase):
    """Our client, against a server side written out by hand from the captures."""

    @defer.inlineCallbacks
    def fake_handler(self, results_chunks):
        """Serve handle-message on comp-ok the way the Go server in capture [5] does."""
        server = yield self.nats()
        calls = Recorder()

        def invoked(msg):
            calls(msg)
            s_inbox = "_INBOX.xWR9OZIaush3LsjiB3bC13"
            server.publish(msg.reply, b"", s_inbox)
            for chunk in results_chunks:
                server.publish(msg.reply + ".results", chunk)
        yield server.subscribe(invocation_subject("default.comp-ok", m.HANDLER, "handle-message"), invoked,
                               queue="default.comp-ok")
        params = Recorder()
        yield server.subscribe("_INBOX.xWR9OZIaush3LsjiB3bC13.params", params)
        return calls, params

    @defer.inlineCallbacks
    def invoke(self, **kw):
        nats, inbox = yield self.endpoint()
        client = WrpcClient(nats, inbox, reactor, **kw)
        body = m.HANDLE_MESSAGE_PARAMS.encode((BrokerMessage("a.b", b"hi"),))
        result = yield client.invoke("default.comp-ok", m.HANDLER, "handle-message", body,
                                     m.HANDLE_MESSAGE_RESULTS,
                                     headers={"source-id": "peer-provider", "target-id": "comp-ok"})
        return result

    @defer.inlineCallbacks
    def test_capture_5_ok(self):
        calls, params = yield self.fake_handler([b"\x00", b""])
        result = yield self.invoke()
        self.assertEqual(result, v.Ok())
        self.assertEqual(calls.messages[0].data, bytes.fromhex("03612e620268690" + "0"))
        self.assertEqual(calls.messages[0].headers, {"source-id": "peer-provider", "target-id": "comp-ok"})
        (eof,) = yield params.until(1)
        self.assertEqual(eof.data, b"")

    @defer.inlineCallbacks
    def test_capture_6_err_value(self):
        yield self.fake_handler([bytes.fromhex("0104626f6f6d"), b""])
        result = yield self.invoke()
        self.assertEqual(result, v.Err("boom"))

    @defer.inlineCallbacks
    def test_capture_7_trap(self):
        yield self.fake_handler([b""])
        error = yield self.assertFailure(self.invoke(), WrpcTrap)
        self.assertIn("ended before a complete value", str(error))

    @defer.inlineCallbacks
    def test_capture_8_no_responders(self):
        started = reactor.seconds()
        yield self.assertFailure(self.invoke(handshake_timeout=5), WrpcNoResponders)
        self.assertLess(reactor.seconds() - started, 5)  # NATS' 503, not the timeout

    @defer.inlineCallbacks
    def test_handshake_timeout(self):
        silent = yield self.nats()
        yield silent.subscribe(invocation_subject("default.comp-ok", m.HANDLER, "handle-message"), lambda msg: None)
        yield self.assertFailure(self.invoke(handshake_timeout=0.3), WrpcTimeout)

    @defer.inlineCallbacks
    def test_results_timeout(self):
        yield self.fake_handler([])  # handshake, then nothing
        error = yield self.assertFailure(self.invoke(results_timeout=0.3), WrpcTimeout)
        self.assertIn("results", str(error))


class SmallPayloadTests(WrpcTestCase):
    """Both of ours, with a max_payload small enough that values span many messages."""

    server_config = "max_payload: 1024"

    @defer.inlineCallbacks
    def test_request_params_and_results_split(self):
        nats, inbox = yield self.endpoint()
        server = WrpcServer(nats, inbox, reactor)
        big = bytes(i % 251 for i in range(5000))

        def request(params, invocation):
            subject, body, timeout_ms = params
            return v.Ok(BrokerMessage(subject, body[::-1], None))
        yield server.serve(PREFIX, m.CONSUMER, "request", m.REQUEST_PARAMS, m.REQUEST_RESULTS, request, queue=PREFIX)
        self.addCleanup(server.stop)
        watcher = yield self.nats()
        wire = Recorder()
        yield watcher.subscribe(">", wire)
        cnats, cinbox = yield self.endpoint()
        client = WrpcClient(cnats, cinbox, reactor)
        self.assertEqual(cnats.max_payload, 1024)
        result = yield client.invoke(PREFIX, m.CONSUMER, "request", m.REQUEST_PARAMS.encode(("svc.x", big, 1000)),
                                     m.REQUEST_RESULTS, headers={"source-id": "comp-ok", "link-name": "default"})
        self.assertEqual(result, v.Ok(BrokerMessage("svc.x", big[::-1])))
        yield watcher.flush()
        sizes = [len(msg.data) for msg in wire.messages if msg.subject.endswith(".results")]
        self.assertEqual(sizes[-1], 0)
        self.assertEqual(sizes[:-1], [1024] * 4 + [5010 - 4096])
        invocation = [msg for msg in wire.messages if msg.subject.endswith(".request")][0]
        self.assertEqual(len(invocation.data), 1024 - len(invocation.subject) - len(invocation.reply)
                         - (10 + 2 + len("source-id: comp-ok\r\n") + len("link-name: default\r\n")))
        self.assertEqual(server.calls, set())


class LatencyTests(WrpcTestCase):
    @defer.inlineCallbacks
    def test_nats_connection_disables_nagle(self):
        """A wRPC call is several small messages each way; with Nagle's algorithm each one
        after the first waits for an ACK (~40 ms with delayed ACKs, measured 44 ms p50 per
        publish before this). So the NATS connection sets TCP_NODELAY."""
        import socket
        nats = yield self.nats()
        handle = nats._protocol.transport.getHandle()
        self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
