"""Cross-check against nats-py as an independent peer, run in its own process.

Payloads and headers sent by one client must arrive byte-exact at the other, and
request/reply must work in both directions.
"""

import base64
import json
import os
import sys

from twisted.internet import defer, protocol, reactor
from twisted.protocols import portforward
from twisted.trial import unittest

from tests.natsserver import NatsServer
from tests.test_nats_client import Collector
from wsprovider.nats import connect

PEER_SCRIPT = r'''
import asyncio, base64, json, sys
import nats

def pack(msg):
    return {"subject": msg.subject, "data": base64.b64encode(msg.data).decode(),
            "headers": msg.headers, "reply": msg.reply or None}

def note(text):
    print("peer: " + text, file=sys.stderr, flush=True)

async def on_error(error):
    note(f"error {error!r}")

async def on_disconnected():
    note("disconnected")

async def on_reconnected():
    note(f"reconnected to {nc.connected_url.netloc if nc.connected_url else None}")

async def server_has_everything_sent(nc):
    """Return once the server has processed all this client sent so far, SUBs included.

    Not nc.flush(): nats-py writes its PING ahead of the commands it still buffers (such
    as the SUB just made), so the PONG can come back before the server has read the SUB.
    A message to ourselves, published after them, arrives only once they are processed.
    """
    inbox = nc.new_inbox()
    probe = await nc.subscribe(inbox)
    await nc.publish(inbox, b"")
    await probe.next_msg(timeout=10)
    await probe.unsubscribe()

async def main(mode, url, subject, spec):
    global nc
    nc = await nats.connect(url, name="nats-py-peer", error_cb=on_error,
                            disconnected_cb=on_disconnected, reconnected_cb=on_reconnected)
    note(f"connected to {nc.connected_url.netloc} as client_id {nc.client_id}")
    if mode == "publish":
        for item in spec:
            await nc.publish(subject, base64.b64decode(item["data"]), headers=item["headers"])
        await nc.flush()
        print("RESULT []", flush=True)
    elif mode == "subscribe":
        got, done = [], asyncio.Event()
        async def on_msg(msg):
            got.append(pack(msg))
            if len(got) == spec:
                done.set()
        await nc.subscribe(subject, cb=on_msg)
        await server_has_everything_sent(nc)
        print("READY", flush=True)
        await asyncio.wait_for(done.wait(), 20)
        print("RESULT " + json.dumps(got), flush=True)
    elif mode == "respond":
        async def on_request_raw(msg):
            note(f"request {len(msg.data)} bytes, reply to {msg.reply}")
            headers = dict(msg.headers or {}, Responder="nats-py")
            await nc.publish(msg.reply, msg.data[::-1], headers=headers)
        await nc.subscribe(subject, cb=on_request_raw)
        await server_has_everything_sent(nc)
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        note("stdin closed: stopping")
        print("RESULT []", flush=True)
    elif mode == "request":
        replies = []
        for item in spec:
            reply = await nc.request(subject, base64.b64decode(item["data"]),
                                     headers=item["headers"], timeout=10)
            replies.append(pack(reply))
        print("RESULT " + json.dumps(replies), flush=True)
    await nc.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])))
'''

PAYLOADS = [b"", b"plain text", b"\r\nMSG fake 1 2\r\n", bytes(range(256)), os.urandom(64 * 1024)]
HEADERS = [None, {"X-Trace": "abc-123"}, {"Content-Type": "application/octet-stream",
                                          "Unicode": "grüße"},
           {"A": "1", "B": "two words"}, {"Big": "x" * 200}]


def spec(payloads=PAYLOADS, headers=HEADERS):
    return [{"data": base64.b64encode(p).decode(), "headers": h}
            for p, h in zip(payloads, headers)]


class PeerProcess(protocol.ProcessProtocol):
    """Runs the nats-py peer; ``ready`` fires on its READY line, ``result`` with its RESULT."""

    def __init__(self):
        self.ready = defer.Deferred()
        self.result = defer.Deferred()
        self.stdout = b""
        self.stderr = b""
        self.exit = None

    def outReceived(self, data):
        self.stdout += data
        for line in self.stdout.split(b"\n")[:-1]:  # complete lines only
            if line == b"READY" and not self.ready.called:
                self.ready.callback(None)
            if line.startswith(b"RESULT ") and not self.result.called:
                self.result.callback(json.loads(line[7:]))

    def errReceived(self, data):
        self.stderr += data

    def processEnded(self, reason):
        self.exit = reason.value
        if self.result.called:
            if not self.ready.called:  # modes without READY: nobody waits on it
                self.ready.callback(None)
            return
        error = RuntimeError(f"nats-py peer exited early (stdout {self.stdout[-300:]!r}): "
                             f"{self.stderr.decode(errors='replace')[-2000:]}")
        for waiter in (self.ready, self.result):
            if not waiter.called:
                waiter.errback(error)
        self.ready.addErrback(lambda failure: None)  # the result carries the error


class _HoldAfterPing(portforward.ProxyServer):
    """Forwards a client's bytes to the server in order, but holds what follows each PING
    for a while: what the server sees when its read of this connection is descheduled
    between two writes of the client's (it answers the PING before it reads the rest)."""

    hold = 0.5

    def connectionMade(self):
        self.queue = bytearray()
        self.held = None
        self.factory.opened(self)
        super().connectionMade()

    def dataReceived(self, data):
        self.queue += data
        if self.held is None:
            self.forward()

    def forward(self):
        self.held = None
        end = self.queue.find(b"PING\r\n")
        cut = len(self.queue) if end < 0 else end + len(b"PING\r\n")
        chunk, self.queue = bytes(self.queue[:cut]), self.queue[cut:]
        if chunk:
            self.peer.transport.write(chunk)
        if end >= 0:
            self.held = reactor.callLater(self.hold, self.forward)

    def connectionLost(self, reason):
        if self.held is not None and self.held.active():
            self.held.cancel()
        super().connectionLost(reason)
        self.factory.closed(self)


class _TrackedProxyClient(portforward.ProxyClient):
    def connectionMade(self):
        self.tracker = self.peer.factory
        self.tracker.opened(self)
        super().connectionMade()

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.tracker.closed(self)


class _TrackedProxyClientFactory(portforward.ProxyClientFactory):
    protocol = _TrackedProxyClient
    noisy = False


class HoldAfterPingProxy(portforward.ProxyFactory):
    """A proxy to a NATS server made of ``_HoldAfterPing`` connections; ``when_idle()``
    fires once all of them (both sides) are closed."""

    protocol = _HoldAfterPing
    noisy = False

    def __init__(self, host, port):
        super().__init__(host, port)
        self.connections = set()
        self._idle = []

    def buildProtocol(self, addr):
        proxy = super().buildProtocol(addr)
        proxy.clientProtocolFactory = _TrackedProxyClientFactory
        return proxy

    def opened(self, connection):
        self.connections.add(connection)

    def closed(self, connection):
        self.connections.discard(connection)
        if not self.connections:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    def when_idle(self):
        if not self.connections:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._idle.append(waiter)
        return waiter


class InteropTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        # -D: the server logs every client connection and why it closed, for diagnosis.
        self.server = NatsServer(self, extra_args=["-D"])
        yield self.server.start()
        self.ours = yield connect(self.server.url, name="ours")
        self.addCleanup(self.ours.close)

    def run_peer(self, mode, subject, argument, url=None):
        script = os.path.abspath(self.mktemp() + ".py")
        with open(script, "w") as script_file:
            script_file.write(PEER_SCRIPT)
        peer = PeerProcess()
        process = reactor.spawnProcess(
            peer, sys.executable,
            [sys.executable, script, mode, url or self.server.url, subject,
             json.dumps(argument)],
            env=dict(os.environ))
        ended = defer.Deferred()
        original = peer.processEnded
        peer.processEnded = lambda reason: (original(reason), ended.callback(None))

        def stop():
            if not ended.called:
                try:
                    process.signalProcess("KILL")
                except Exception:
                    pass
            return ended
        self.addCleanup(stop)
        peer.process = process
        peer.ready.addTimeout(30, reactor)
        peer.result.addTimeout(30, reactor)
        return peer

    def diagnosis(self, peer, what):
        """What went wrong, with the peer's output and both sides' view of the server."""
        ours = self.ours
        info = ours.server_info
        return "\n".join([
            what,
            f"peer: exit={peer.exit!r} stdout={peer.stdout[-500:]!r}",
            "peer stderr:", peer.stderr.decode(errors="replace")[-3000:],
            f"ours: state={ours.state.value} connected to "
            f"{ours.connected_server.netloc if ours.connected_server else None} "
            f"(server_id {info.get('server_id')}, port {info.get('port')}, "
            f"client_id {info.get('client_id')}); test server {self.server.url} "
            f"running={self.server.running}",
            "server log:", self.server.log[-4000:]])

    def assert_same(self, received, payloads=PAYLOADS, headers=HEADERS):
        self.assertEqual([base64.b64decode(r["data"]) for r in received], payloads)
        self.assertEqual([r["headers"] for r in received], headers)

    @defer.inlineCallbacks
    def test_nats_py_publishes_to_us(self):
        collector = Collector(len(PAYLOADS))
        yield self.ours.subscribe("interop.in", collector)
        peer = self.run_peer("publish", "interop.in", spec())
        yield peer.result
        messages = yield collector.wait(30)
        self.assertEqual([m.data for m in messages], PAYLOADS)
        self.assertEqual([m.headers for m in messages], HEADERS)

    @defer.inlineCallbacks
    def test_we_publish_to_nats_py(self):
        peer = self.run_peer("subscribe", "interop.out", len(PAYLOADS))
        yield peer.ready
        for payload, headers in zip(PAYLOADS, HEADERS):
            self.ours.publish("interop.out", payload, headers=headers)
        received = yield peer.result
        self.assert_same(received)

    @defer.inlineCallbacks
    def test_we_request_nats_py_responds(self):
        peer = self.run_peer("respond", "interop.service", [])
        yield peer.ready
        for index, (payload, headers) in enumerate(zip(PAYLOADS, HEADERS)):
            try:
                reply = yield self.ours.request("interop.service", payload, timeout=10,
                                                headers=headers)
            except Exception as error:
                self.fail(self.diagnosis(peer, f"request {index} ({len(payload)} bytes, "
                                               f"headers {headers!r}) failed: {error!r}"))
            self.assertEqual(reply.data, payload[::-1])
            self.assertEqual(reply.headers, dict(headers or {}, Responder="nats-py"))
        peer.process.closeStdin()
        yield peer.result

    @defer.inlineCallbacks
    def test_peer_ready_means_the_server_has_its_subscription(self):
        """READY is printed once the server has the peer's SUB, even if it reads it late.

        nats-py's flush() writes its PING ahead of commands it still buffers, such as the
        SUB just made: its PONG can come back before the server has read that SUB. Under
        load a READY based on it let our first request find no responders. The proxy
        here makes the server read everything after a PING late, every time."""
        proxy = HoldAfterPingProxy("127.0.0.1", self.server.port)
        listening = reactor.listenTCP(0, proxy, interface="127.0.0.1")
        self.addCleanup(proxy.when_idle)
        self.addCleanup(listening.stopListening)
        peer = self.run_peer("respond", "interop.service", [],
                             url=f"nats://127.0.0.1:{listening.getHost().port}")
        yield peer.ready
        try:
            reply = yield self.ours.request("interop.service", b"abc", timeout=10)
        except Exception as error:
            self.fail(self.diagnosis(peer, f"request failed: {error!r}"))
        self.assertEqual(reply.data, b"cba")
        peer.process.closeStdin()
        yield peer.result

    @defer.inlineCallbacks
    def test_nats_py_requests_we_respond(self):
        yield self.ours.subscribe(
            "interop.ours",
            lambda msg: msg.respond(msg.data[::-1], headers=dict(msg.headers or {}, By="us")))
        peer = self.run_peer("request", "interop.ours", spec())
        replies = yield peer.result
        self.assertEqual([base64.b64decode(r["data"]) for r in replies],
                         [p[::-1] for p in PAYLOADS])
        self.assertEqual([r["headers"] for r in replies],
                         [dict(h or {}, By="us") for h in HEADERS])
