"""Cross-check against nats-py as an independent peer, run in its own process.

Payloads and headers sent by one client must arrive byte-exact at the other, and
request/reply must work in both directions.
"""

import base64
import json
import os
import sys

from twisted.internet import defer, protocol, reactor
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

async def main(mode, url, subject, spec):
    nc = await nats.connect(url, name="nats-py-peer")
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
        await nc.flush()
        print("READY", flush=True)
        await asyncio.wait_for(done.wait(), 20)
        print("RESULT " + json.dumps(got), flush=True)
    elif mode == "respond":
        async def on_request_raw(msg):
            headers = dict(msg.headers or {}, Responder="nats-py")
            await nc.publish(msg.reply, msg.data[::-1], headers=headers)
        await nc.subscribe(subject, cb=on_request_raw)
        await nc.flush()
        print("READY", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
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


class InteropTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.server = NatsServer(self)
        yield self.server.start()
        self.ours = yield connect(self.server.url, name="ours")
        self.addCleanup(self.ours.close)

    def run_peer(self, mode, subject, argument):
        script = os.path.abspath(self.mktemp() + ".py")
        with open(script, "w") as script_file:
            script_file.write(PEER_SCRIPT)
        peer = PeerProcess()
        process = reactor.spawnProcess(
            peer, sys.executable,
            [sys.executable, script, mode, self.server.url, subject, json.dumps(argument)],
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
        for payload, headers in zip(PAYLOADS, HEADERS):
            reply = yield self.ours.request("interop.service", payload, timeout=10,
                                            headers=headers)
            self.assertEqual(reply.data, payload[::-1])
            self.assertEqual(reply.headers, dict(headers or {}, Responder="nats-py"))
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
