"""``--workers``: real worker processes sharing a loopback port, meeting on a real nats-server.

Every test starts a ``WorkerSupervisor`` in this process (the trial reactor runs it as
twistd would) with two workers and the embedded nats-server, and talks to it with
``websockets`` peers and the project's NATS client. Which worker a session landed on is
read from the supervisor's relayed log lines ("worker <n>: ... session <id> opened").
"""

from __future__ import annotations

import os
import re
import signal

from twisted.internet import defer, reactor
from twisted.logger import globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from wsprovider.config import ConfigError, ProviderConfig
from wsprovider.workers import IWorkerEvents, WorkerSupervisor, listen_address

from .peers import WebsocketsPeer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OPENED = re.compile(r"session (\S+) opened")


@implementer(IWorkerEvents)
class Events:
    def __init__(self):
        self.ready = []   # (index, pid)
        self.exited = []  # (index, pid, exit_code, signal)
        self._waiters = []

    def worker_ready(self, index, pid):
        self.ready.append((index, pid))
        self._fire()

    def worker_exited(self, index, pid, exit_code, sig):
        self.exited.append((index, pid, exit_code, sig))
        self._fire()

    def when(self, condition):
        d = defer.Deferred()
        self._waiters.append((condition, d))
        self._fire()
        return d

    def changed(self):
        reactor.callLater(0, self._fire)  # not from inside a log observer

    def _fire(self):
        for condition, d in list(self._waiters):
            if condition():
                self._waiters.remove((condition, d))
                d.callback(None)


class SessionsByWorker:
    """Which worker each session opened on, from the supervisor's relayed worker log lines."""

    def __init__(self, testcase, on_change):
        self.worker_of = {}
        self._on_change = on_change
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        if event.get("log_format") != "worker {index}: {line}":
            return
        m = _OPENED.search(event["line"])
        if m:
            self.worker_of[m.group(1)] = event["index"]
            self._on_change()


class WorkerSupervisorTests(unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def start(self, count=2, **config):
        values = {"MODE": "server", "URI": "tcp:0:interface=127.0.0.1", "WORKERS": str(count),
                  "DRAIN_TIMEOUT_SEC": "5"}
        values.update(config)
        self.events = Events()
        self.sessions = SessionsByWorker(self, self.events.changed)
        supervisor = WorkerSupervisor(ProviderConfig.from_mapping(values), ["wsprovider.handlers:echo"],
                                      events=self.events, env={"PYTHONPATH": ROOT})  # this tree, not site-packages
        supervisor.startService()
        self.addCleanup(lambda: supervisor.running and supervisor.stopService())
        yield supervisor.when_ready()
        self.url = f"ws://127.0.0.1:{supervisor.port}/ws"
        return supervisor

    @defer.inlineCallbacks
    def peers_on_both_workers(self, at_least=8, at_most=64):
        """Connect peers until sessions exist on worker 0 and worker 1 (bounded)."""
        peers = []
        while len(peers) < at_most:
            peer = yield WebsocketsPeer.connect(self.url)
            self.addCleanup(peer.close)
            peers.append(peer)
            if len(peers) >= at_least:
                yield self.events.when(lambda: all(p.session_id in self.sessions.worker_of for p in peers))
                on = {self.sessions.worker_of[p.session_id] for p in peers}
                if on == {0, 1}:
                    return peers
        self.fail(f"{at_most} sessions all opened on one worker")

    @defer.inlineCallbacks
    def test_session_reaches_session_on_other_worker_and_broadcast_reaches_all(self):
        supervisor = yield self.start()
        peers = yield self.peers_on_both_workers()
        worker_of = self.sessions.worker_of
        sender = next(p for p in peers if worker_of[p.session_id] == 0)
        receiver = next(p for p in peers if worker_of[p.session_id] == 1)

        yield sender.send_json({"subject": receiver.address, "body": "across workers"})
        got = yield receiver.recv_json()
        self.assertEqual((got["type"], got["body"]), ("message", "across workers"))

        # The echo handler runs in every worker; the reply reaches the sender wherever it ran.
        yield receiver.send_json({"subject": "echo.x", "body": "echoed"})
        got = yield receiver.recv_json()
        self.assertEqual((got["subject"], got["body"]), (receiver.address, "echoed"))

        # A broadcast published on the bus reaches every session on every worker.
        from wsprovider.nats import connect
        client = yield connect(supervisor.nats_url, reactor=reactor, name="test-broadcaster")
        self.addCleanup(client.close)
        client.publish("_ws.broadcast.news", b"to everyone")
        yield client.flush()
        for peer in peers:
            got = yield peer.recv_json()
            self.assertEqual(got["body"], "to everyone", got)

    @defer.inlineCallbacks
    def test_a_worker_that_dies_is_restarted(self):
        supervisor = yield self.start()
        index, pid = self.events.ready[0]
        os.kill(pid, signal.SIGKILL)
        yield self.events.when(lambda: any(e[1] == pid for e in self.events.exited))
        yield self.events.when(lambda: sum(1 for i, _ in self.events.ready if i == index) == 2)
        new_pid = [p for i, p in self.events.ready if i == index][-1]
        self.assertNotEqual(new_pid, pid)
        self.assertIsNotNone(supervisor.workers[index].process)
        peers = yield self.peers_on_both_workers()  # both workers accept again
        yield peers[0].send_json({"subject": "echo.x", "body": "still here"})
        self.assertEqual((yield peers[0].recv_json())["body"], "still here")

    @defer.inlineCallbacks
    def test_stop_drains_every_worker(self):
        supervisor = yield self.start()
        peers = yield self.peers_on_both_workers()
        yield supervisor.stopService()
        for peer in peers:
            code, _ = yield peer.wait_closed()
            self.assertEqual(code, 1001)
        self.assertEqual(sorted(e[0] for e in self.events.exited), [0, 1])
        self.assertTrue(all(w.process is None for w in supervisor.workers))
        self.assertIsNone(supervisor.nats._ended)  # the embedded nats-server has exited
        yield self.assertFailure(WebsocketsPeer.connect(self.url, open_timeout=5), OSError)


class ListenAddressTests(unittest.TestCase):
    def test_tcp_forms(self):
        import socket
        self.assertEqual(listen_address("127.0.0.1:8080"), (socket.AF_INET, "127.0.0.1", 8080, 50))
        self.assertEqual(listen_address("tcp:0:interface=127.0.0.1:backlog=4096"),
                         (socket.AF_INET, "127.0.0.1", 0, 4096))
        self.assertEqual(listen_address("[::1]:9000"), (socket.AF_INET6, "::1", 9000, 50))
        self.assertEqual(listen_address(None), (socket.AF_INET, "127.0.0.1", 8080, 50))

    def test_tls_and_unix_endpoints_are_refused_with_the_fix(self):
        for uri in ("ssl:8443:privateKey=k.pem:certKey=c.pem", "unix:/tmp/ws.sock"):
            e = self.assertRaises(ConfigError, listen_address, uri)
            self.assertIn("--workers shares a TCP socket", str(e))

    def test_workers_setting_is_validated(self):
        self.assertEqual(ProviderConfig.from_mapping({}).workers, 1)
        e = self.assertRaises(ConfigError, ProviderConfig.from_mapping, {"WORKERS": "0"})
        self.assertIn("WORKERS", str(e))
