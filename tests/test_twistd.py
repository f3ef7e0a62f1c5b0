"""The twistd plugin, run as a user would: a real ``twistd`` process."""

import os
import sys

from twisted.internet import defer, utils
from twisted.trial import unittest

from wsprovider.config import SETTINGS

from .peers import WebsocketsPeer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


TWISTD = ["-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


def twistd(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return utils.getProcessOutputAndValue(sys.executable, tuple(TWISTD) + args, env=env, path=ROOT)


class TwistdOptionTests(unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_help_lists_every_option(self):
        out, err, code = yield twistd("wsprovider", "--help")
        self.assertEqual(code, 0, err)
        text = out.decode()
        for setting in SETTINGS:
            self.assertIn("--" + setting.flag + "=", text)
        for flag in ("--handler=", "--header="):
            self.assertIn(flag, text)

    @defer.inlineCallbacks
    def test_bad_options_are_usage_errors(self):
        cases = [
            (["--mode=bogus"], "--mode (MODE): 'bogus' is not valid; accepted values: server, client"),
            (["--max-message-size=abc"], "--max-message-size (MAX_MESSAGE_SIZE)"),
            (["--uri=host:port"], "port 'port' is not a number"),
            (["--handler=nonexistent.module:x"], "cannot import module"),
            (["--handler=wsprovider.handlers"], "expected module:attribute"),
            (["--handler=wsprovider.handlers:nothing"], "has no attribute"),
            (["--ping-interval-sec=-1"], "out of range"),
            (["--jwt-public-key=/nonexistent/key.pem"], "--jwt-public-key (JWT_PUBLIC_KEY): cannot load"),
            (["--jwt-algorithms=HS256"], "--jwt-algorithms (JWT_ALGORITHMS)"),
        ]
        for args, expected in cases:
            out, err, code = yield twistd("-n", "--pidfile=", "wsprovider", *args)
            self.assertNotEqual(code, 0, args)
            text = (out + err).decode()
            self.assertIn(expected, text, args)
            self.assertNotIn("Traceback", text, args)

    @defer.inlineCallbacks
    def test_runs_and_serves(self):
        """Start a real twistd, talk to it, stop it with SIGTERM."""
        from twisted.internet import reactor, protocol
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ready = defer.Deferred()
        ended = defer.Deferred()

        class Watch(protocol.ProcessProtocol):
            output = b""

            def outReceived(self, data):
                self.output += data
                if not ready.called and b"wsprovider listening" in self.output:
                    ready.callback(None)

            errReceived = outReceived

            def processEnded(self, reason):
                if not ready.called:
                    ready.errback(RuntimeError(self.output.decode()))
                ended.callback((reason.value.exitCode, reason.value.signal, self.output))

        watch = Watch()
        proc = reactor.spawnProcess(
            watch, sys.executable,
            [sys.executable] + TWISTD + ["-n", "--pidfile=", "wsprovider",
             f"--uri=tcp:{port}:interface=127.0.0.1", "--handler=wsprovider.handlers:echo"],
            env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT)
        self.addCleanup(lambda: proc.pid and proc.signalProcess("KILL"))
        yield ready
        peer = yield WebsocketsPeer.connect(f"ws://127.0.0.1:{port}/ws")
        yield peer.send_json({"subject": "anything", "body": "hi"})
        self.assertEqual((yield peer.recv_json())["body"], "hi")
        proc.signalProcess("TERM")
        code, _ = yield peer.wait_closed()
        self.assertEqual(code, 1001)
        exit_code, signal, output = yield ended
        # Twisted re-raises the terminating signal after a clean shutdown.
        self.assertIn((exit_code, signal), [(0, None), (None, 15)], output.decode())
        self.assertIn(b"Server Shut Down.", output)
        self.assertNotIn(b"Traceback", watch.output)
