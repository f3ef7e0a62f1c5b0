"""Graceful drain of a real ``twistd`` process on SIGTERM, with sessions open."""

import os
import socket
import sys

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from .peers import WebsocketsPeer
from .test_twistd import ROOT, TWISTD


class Watch(protocol.ProcessProtocol):
    """Collects the output; Deferreds for a line appearing and for the end."""

    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()
        self._waiting = []  # (needle, deferred)

    def wait_for(self, needle: bytes):
        d = defer.Deferred()
        if needle in self.output:
            d.callback(None)
        else:
            self._waiting.append((needle, d))
        return d

    def outReceived(self, data):
        self.output += data
        still = []
        for needle, d in self._waiting:
            if needle in self.output:
                d.callback(None)
            else:
                still.append((needle, d))
        self._waiting = still

    errReceived = outReceived

    def processEnded(self, reason):
        for _, d in self._waiting:
            d.errback(RuntimeError(self.output.decode()))
        self._waiting = []
        self.ended.callback((reason.value.exitCode, reason.value.signal, self.output))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class TwistdDrainTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_sigterm_drains_in_flight_request_then_1001(self):
        port = free_port()
        watch = Watch()
        proc = reactor.spawnProcess(
            watch, sys.executable,
            [sys.executable] + TWISTD + [
                "-n", "--pidfile=", "wsprovider", f"--uri=tcp:{port}:interface=127.0.0.1",
                "--handler=tests.drain_handler:hold",
                "--subscriptions=held.>", "--drain-timeout-sec=20"],
            env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT)
        self.addCleanup(lambda: proc.pid and proc.signalProcess("KILL"))
        yield watch.wait_for(b"wsprovider listening")
        url = f"ws://127.0.0.1:{port}/ws"
        idle = yield WebsocketsPeer.connect(url)
        busy = yield WebsocketsPeer.connect(url)
        yield busy.send_json({"type": "request", "id": 42, "subject": "held.work", "body": "?", "timeout_ms": 30000})
        yield watch.wait_for(b"holding a request on held.work")

        proc.signalProcess("TERM")
        code, _ = yield idle.wait_closed()
        self.assertEqual(code, 1001)
        self.assertNotIn(b"answering the held request", watch.output)  # told before the reply existed
        reply = yield busy.recv_json()
        self.assertEqual((reply["type"], reply["id"], reply["body"]), ("reply", 42, "answered during drain"))
        code, _ = yield busy.wait_closed()
        self.assertEqual(code, 1001)

        exit_code, signal, output = yield watch.ended
        self.assertIn((exit_code, signal), [(0, None), (None, 15)], output.decode())
        text = output.decode()
        self.assertIn("draining: waiting up to 20.0s for 1 in-flight requests", text)
        self.assertLess(text.index("(TCP Port"), text.index("draining: waiting"))  # stopped listening first
        self.assertIn("Server Shut Down.", text)
        self.assertNotIn("Traceback", text)
