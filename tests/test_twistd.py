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


class StartupFailureTests(unittest.TestCase):
    """A service that cannot start says why in one line and exits (issue 14)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_port_in_use_exits_with_one_line_naming_uri(self):
        import socket
        import time
        holder = socket.socket()
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        self.addCleanup(holder.close)
        port = holder.getsockname()[1]
        started = time.monotonic()
        out, err, code = yield twistd("-n", "--pidfile=", "wsprovider", f"--uri=127.0.0.1:{port}")
        elapsed = time.monotonic() - started
        text = (out + err).decode()
        self.assertNotEqual(code, 0, text)
        self.assertNotIn("Traceback", text)
        lines = [line for line in text.splitlines() if "could not start" in line]
        self.assertEqual(len(lines), 1, text)
        self.assertIn("--uri (URI)", lines[0])
        self.assertIn(f"port {port} on 127.0.0.1 is already in use", lines[0])
        # The interpreter start-up dominates; the bound from the issue is 2 s on an idle machine.
        self.assertLess(elapsed, 20, text)

    @defer.inlineCallbacks
    def test_bad_tls_key_names_uri(self):
        out, err, code = yield twistd("-n", "--pidfile=", "wsprovider",
                                      "--uri=ssl:0:privateKey=/nonexistent/k.pem:certKey=/nonexistent/c.pem")
        text = (out + err).decode()
        self.assertNotEqual(code, 0, text)
        self.assertNotIn("Traceback", text)
        self.assertIn("--uri (URI): cannot load the TLS key or certificate", text)
        garbage = os.path.abspath(self.mktemp())
        with open(garbage, "w") as f:
            f.write("not a PEM file\n")
        out, err, code = yield twistd("-n", "--pidfile=", "wsprovider",
                                      f"--uri=ssl:0:privateKey={garbage}:certKey={garbage}")
        text = (out + err).decode()
        self.assertNotEqual(code, 0, text)
        self.assertNotIn("Traceback", text)
        self.assertIn("--uri (URI): cannot load the TLS key or certificate", text)

    @defer.inlineCallbacks
    def test_nats_required_at_start_and_unreachable_names_nats_url(self):
        from .natsserver import free_port
        url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
        out, err, code = yield twistd("-n", "--pidfile=", "wsprovider", "--uri=tcp:0:interface=127.0.0.1",
                                      f"--nats={url}", "--nats-startup-timeout-sec=0.5")
        text = (out + err).decode()
        self.assertNotEqual(code, 0, text)
        self.assertNotIn("Traceback", text)
        lines = [line for line in text.splitlines() if "could not start" in line]
        self.assertEqual(len(lines), 1, text)
        self.assertIn(f"--nats-url (NATS_URL): cannot reach NATS at {url} within 0.5 s", lines[0])

    @defer.inlineCallbacks
    def test_failing_handler_factory_is_one_line(self):
        out, err, code = yield twistd("-n", "--pidfile=", "wsprovider", "--handler=builtins:len")
        text = (out + err).decode()
        self.assertNotEqual(code, 0, text)
        self.assertNotIn("Traceback", text)
        self.assertIn("--handler 'builtins:len': could not create the handler", text)

    @defer.inlineCallbacks
    def test_usage_error_is_short_and_points_at_help(self):
        out, err, code = yield twistd("-n", "wsprovider", "--mode=clinet")
        text = (out + err).decode()
        self.assertNotEqual(code, 0)
        self.assertLess(len(text.strip().splitlines()), 5, text)
        self.assertIn("'clinet' is not valid", text)
        self.assertIn("see `twistd wsprovider --help`", text)

    @defer.inlineCallbacks
    def test_help_opens_with_examples_and_essentials(self):
        out, err, code = yield twistd("wsprovider", "--help")
        text = out.decode()
        self.assertEqual(code, 0, err)
        head = text[:text.index("Essentials:")]
        for example in ("--handler wsprovider.handlers:echo", "--mode=client", "--nats nats://", "wash dev"):
            self.assertIn(example, head)
        essentials = text[text.index("Essentials:"):text.index("\nServer mode:\n")]
        for flag in ("--mode=", "--uri=", "--handler=", "--nats=", "--console="):
            self.assertIn(flag, essentials)
        self.assertLess(text.index("Essentials:"), text.index("Limits and timing:"))
