"""The NATS lattice in operation: permissions, session events, the subject prefix, NATS
outages under live sessions, and an instance that crashes (a real twistd process)."""

import json
import os
import sys
import time

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from wsprovider import BrokerMessage, NotConnected

from .natsserver import NatsServer, free_port
from .test_nats_lattice import Collector, connect, nats_client, start_nats_provider, wait_connected

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = ["-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"]


class NatsServerMixin:
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.nats = NatsServer(self)
        yield self.nats.start()


class PermissionTests(NatsServerMixin, unittest.TestCase):
    DENIED_PUBLISH = [
        ("$SYS.REQ.SERVER.PING", "deny $SYS.>"),
        ("_INBOX.abc.1", "deny _INBOX.>"),
        ("$JS.API.INFO", "deny $JS.>"),
        ("$KV.bucket.key", "deny $KV.>"),
        ("runtime.host.h1.workload.start", "deny runtime.>"),
        ("wasmbus.ctl.v1.default.host.ping", "deny wasmbus.>"),
        ("_ws.ctl.sessions", "deny _ws.ctl.>"),
        ("_ws.broadcast.spoof", "deny _ws.broadcast.>"),
        ("_ws.events.session.joined", "deny _ws.events.>"),
    ]
    DENIED_SUBSCRIBE = [
        ("$SYS.>", "deny $SYS.>"), ("_INBOX.>", "deny _INBOX.>"), ("$JS.API.>", "deny $JS.>"),
        ("runtime.>", "deny runtime.>"), ("wasmbus.*.x", "deny wasmbus.>"), ("_ws.ctl.*", "deny _ws.>"),
        ("_ws.session.*", "deny _ws.>"), (">", "deny $SYS.>"),
    ]

    @defer.inlineCallbacks
    def test_system_subjects_unreachable_over_nats(self):
        provider = yield start_nats_provider(self, self.nats.url)
        spy = yield nats_client(self, self.nats.url)
        seen = Collector()
        for subject, _rule in self.DENIED_PUBLISH:
            yield spy.subscribe(subject, seen)
        marker = Collector()
        yield spy.subscribe("ok.marker", marker)
        peer = yield connect(provider)
        for i, (subject, rule) in enumerate(self.DENIED_PUBLISH):
            yield peer.send_json({"subject": subject, "body": "x", "id": i})
            err = yield peer.recv_json()
            self.assertEqual((err["type"], err["code"], err["id"]), ("error", "permission_denied", i))
            self.assertIn(f"({rule})", err["message"])
            self.assertIn(repr(subject), err["message"])
        yield peer.send_json({"type": "request", "id": "r", "subject": "$SYS.REQ.SERVER.PING"})
        err = yield peer.recv_json()
        self.assertEqual((err["code"], err["id"]), ("permission_denied", "r"))
        yield peer.send_json({"subject": "ok.x", "body": "x", "reply_to": "runtime.steal", "id": "rt"})
        err = yield peer.recv_json()
        self.assertEqual(err["code"], "permission_denied")
        self.assertIn("reply_to 'runtime.steal' is not allowed (deny runtime.>)", err["message"])
        for i, (pattern, rule) in enumerate(self.DENIED_SUBSCRIBE):
            yield peer.send_json({"type": "subscribe", "subject": pattern, "id": i})
            err = yield peer.recv_json()
            self.assertEqual((err["code"], err["id"]), ("permission_denied", i))
            self.assertIn(f"({rule})", err["message"])
        # The same session's next allowed message reaches NATS; nothing denied got there before it.
        yield peer.send_json({"subject": "ok.marker", "body": "done"})
        got = yield marker.next()
        self.assertEqual(got.data, b"done")
        self.assertEqual(seen.received, [])
        yield peer.close()


class SessionEventTests(NatsServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_joined_and_left_events(self):
        provider = yield start_nats_provider(self, self.nats.url, SESSION_EVENTS="true", INSTANCE_ID="ev1")
        listener = yield nats_client(self, self.nats.url)
        events = Collector()
        yield listener.subscribe("_ws.events.session.*", events)
        joined = events.next()
        peer = yield connect(provider)
        msg = yield joined
        event = json.loads(msg.data)
        self.assertEqual(msg.subject, "_ws.events.session.joined")
        self.assertEqual((event["event"], event["session_id"], event["address"], event["instance"]),
                         ("joined", peer.session_id, peer.address, "ev1"))
        left = events.next()
        yield peer.close()
        msg = yield left
        event = json.loads(msg.data)
        self.assertEqual(msg.subject, "_ws.events.session.left")
        self.assertEqual((event["event"], event["session_id"], event["code"]), ("left", peer.session_id, 1000))

    @defer.inlineCallbacks
    def test_events_off_by_default_and_subjects_configurable(self):
        listener = yield nats_client(self, self.nats.url)
        events = Collector()
        yield listener.subscribe("_ws.events.>", events)
        custom = Collector()
        yield listener.subscribe("audit.ws.>", custom)
        quiet = yield start_nats_provider(self, self.nats.url)
        loud = yield start_nats_provider(self, self.nats.url, SESSION_EVENTS="true",
                                         SESSION_JOINED_SUBJECT="audit.ws.in", SESSION_LEFT_SUBJECT="audit.ws.out")
        p1 = yield connect(quiet)
        joined = custom.next()
        p2 = yield connect(loud)
        msg = yield joined
        self.assertEqual((msg.subject, json.loads(msg.data)["session_id"]), ("audit.ws.in", p2.session_id))
        self.assertEqual(events.received, [])
        yield p1.close()
        yield p2.close()


class SubjectPrefixTests(NatsServerMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def test_prefix_applies_to_peer_subjects_only(self):
        provider = yield start_nats_provider(self, self.nats.url, NATS_SUBJECT_PREFIX="app")
        component = yield nats_client(self, self.nats.url)
        yield component.subscribe("app.svc.upper", lambda m: m.respond(m.data.upper()))
        peer = yield connect(provider)
        self.assertTrue(peer.address.startswith("_ws.session."))  # addresses are never prefixed
        yield peer.send_json({"subject": "svc.upper", "body": "hi"})
        frame = yield peer.recv_json()
        self.assertEqual(frame, {"type": "message", "subject": peer.address, "body": "HI"})
        yield peer.send_json({"type": "request", "id": 1, "subject": "svc.upper", "body": "q"})
        self.assertEqual((yield peer.recv_json())["body"], "Q")
        yield peer.subscribe("chat.>")
        yield component.publish("chat.unprefixed", b"not for peers")
        yield component.publish("app.chat.room", b"for peers")
        frame = yield peer.recv_json()
        self.assertEqual((frame["subject"], frame["body"]), ("chat.room", "for peers"))
        # A component reaches the session at its (unprefixed) address.
        yield component.publish(peer.address, b"direct")
        self.assertEqual((yield peer.recv_json())["body"], "direct")
        yield peer.close()


class OutageTests(NatsServerMixin, unittest.TestCase):
    """nats-server dies and comes back while sessions are connected."""

    timeout = 45

    @defer.inlineCallbacks
    def test_unbuffered_outage_error_frames_then_recovery(self):
        provider = yield start_nats_provider(self, self.nats.url, NATS_BUFFER_BYTES="0")
        component = yield nats_client(self, self.nats.url)
        yield component.subscribe("svc.upper", lambda m: m.respond(m.data.upper()))
        peer = yield connect(provider)
        self.assertTrue(provider.is_ready())
        yield self.nats.kill()
        yield wait_connected(provider.lattice, False)
        self.assertFalse(provider.is_ready())
        yield peer.send_json({"subject": "svc.upper", "body": "lost?", "id": 1})
        err = yield peer.recv_json()
        self.assertEqual((err["type"], err["code"], err["id"]), ("error", "not_connected", 1))
        self.assertIn("NATS is not connected", err["message"])
        yield peer.send_json({"type": "request", "subject": "svc.upper", "body": "q", "id": 2})
        err = yield peer.recv_json()
        self.assertEqual((err["code"], err["id"]), ("not_connected", 2))
        # The session itself is fine.
        yield peer.send_json({"type": "ping", "id": 3})
        self.assertEqual((yield peer.recv_json()), {"type": "pong", "id": 3})
        started = time.monotonic()
        yield self.nats.start()
        yield wait_connected(provider.lattice, True)
        self.reconnect_s = time.monotonic() - started
        self.assertTrue(provider.is_ready())
        yield component.when_connected()
        yield component.flush()
        # Subscriptions came back by themselves: the session's address and the component's.
        yield peer.send_json({"type": "request", "subject": "svc.upper", "body": "back", "id": 4,
                              "timeout_ms": 5000})
        reply = yield peer.recv_json()
        self.assertEqual((reply["type"], reply["body"]), ("reply", "BACK"))
        yield component.publish(peer.address, b"reachable again")
        self.assertEqual((yield peer.recv_json())["body"], "reachable again")
        yield peer.close()

    @defer.inlineCallbacks
    def test_buffered_outage_delivers_later_and_refuses_when_full(self):
        provider = yield start_nats_provider(self, self.nats.url, NATS_BUFFER_BYTES="4096")
        peer = yield connect(provider)
        yield peer.subscribe("news.*")
        yield self.nats.kill()
        yield wait_connected(provider.lattice, False)
        # Small messages wait in the bounded buffer (no error) ...
        yield peer.send_json({"subject": peer.address + ".later", "body": "kept for later"})
        yield peer.send_json({"subject": "news.1", "body": "also kept"})
        # ... a message that does not fit is refused with an error frame, never dropped silently.
        yield peer.send_json({"subject": "news.2", "body": "x" * 5000, "id": "big"})
        err = yield peer.recv_json()
        self.assertEqual((err["code"], err["id"]), ("buffer_full", "big"))
        self.assertIn("buffer of 4096 bytes is full", err["message"])
        yield self.nats.start()
        # On reconnect the subscriptions are restored before the buffer is sent, so the
        # session gets its own buffered messages back, in order.
        first = yield peer.recv_json()
        second = yield peer.recv_json()
        self.assertEqual([(first["subject"], first["body"]), (second["subject"], second["body"])],
                         [(peer.address + ".later", "kept for later"), ("news.1", "also kept")])
        yield peer.close()


class _Twistd(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data
        if not self.ready.called and b"wsprovider listening" in self.output:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode(errors="replace")))
        self.ended.callback(None)


class CrashedInstanceTests(NatsServerMixin, unittest.TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_crashed_instance_sessions_disappear(self):
        survivor = yield start_nats_provider(self, self.nats.url, INSTANCE_ID="survivor")
        port = free_port()
        watch = _Twistd()
        proc = reactor.spawnProcess(
            watch, sys.executable,
            [sys.executable] + TWISTD + ["-n", "--pidfile=", "wsprovider", f"--uri=tcp:{port}:interface=127.0.0.1",
                                         "--nats", self.nats.url, "--instance-id=crashy",
                                         "--cluster-heartbeat-sec=0.2"],
            env=dict(os.environ, PYTHONPATH=ROOT), path=ROOT)
        self.addCleanup(lambda: watch.ended.called or proc.signalProcess("KILL"))
        self.addCleanup(lambda: watch.ended)
        yield watch.ready
        yield survivor.cluster.wait_for_instance("crashy")
        from .peers import WebsocketsPeer
        doomed = yield WebsocketsPeer.connect(f"ws://127.0.0.1:{port}/ws")
        local = yield connect(survivor)
        # Reachable across instances while alive.
        yield survivor.send_to_session(doomed.session_id, BrokerMessage("hello", b"from survivor"))
        self.assertEqual((yield doomed.recv_json())["body"], "from survivor")
        sessions = yield survivor.list_sessions(cluster=True)
        self.assertEqual(sorted(s["session_id"] for s in sessions), sorted([doomed.session_id, local.session_id]))
        proc.signalProcess("KILL")
        yield watch.ended
        started = time.monotonic()
        sessions = yield survivor.list_sessions(cluster=True)
        self.listing_after_crash_s = time.monotonic() - started
        self.assertEqual([s["session_id"] for s in sessions], [local.session_id])
        self.assertLessEqual(self.listing_after_crash_s, 1.5 + 1.5)  # CLUSTER_LIST_TIMEOUT_MS + slack
        yield self.assertFailure(
            survivor.send_to_session(doomed.session_id, BrokerMessage("hello", b"gone?")), NotConnected)
        yield local.close()


class ClusterFailoverTests(unittest.TestCase):
    timeout = 45

    @defer.inlineCallbacks
    def test_instance_fails_over_to_another_node(self):
        """A's node dies: A reconnects to a node it learned from the cluster; its sessions
        stay open and become reachable again from B, with their subscriptions."""
        from .natsserver import start_cluster
        servers = yield start_cluster(self, size=3)
        a = yield start_nats_provider(self, servers[0].url, INSTANCE_ID="fa")
        b = yield start_nats_provider(self, servers[2].url, INSTANCE_ID="fb")
        pa = yield connect(a)
        pb = yield connect(b)
        yield pa.subscribe("room.*")
        yield servers[0].kill()
        yield wait_connected(a.lattice, False)
        started = time.monotonic()
        yield wait_connected(a.lattice, True)
        self.failover_s = time.monotonic() - started
        self.assertNotEqual(a.lattice.client.connected_server.port, servers[0].port)
        # Restored interest may take a moment to cross the routes: B's acknowledged send
        # tells us when A's session is reachable again (bounded by the test timeout).
        while True:
            try:
                yield b.send_to_session(pa.session_id, BrokerMessage("probe", b""))
                break
            except NotConnected:
                continue
        self.assertEqual((yield pa.recv_json())["subject"], "probe")
        yield pb.send_json({"subject": "room.1", "body": "after failover"})
        frame = yield pa.recv_json()
        self.assertEqual((frame["subject"], frame["body"]), ("room.1", "after failover"))
        yield pb.send_json({"subject": pa.address, "body": "direct"})
        self.assertEqual((yield pa.recv_json())["body"], "direct")
        yield pa.close()
        yield pb.close()


class ShutdownLeavesNoListenersTests(NatsServerMixin, unittest.TestCase):
    """``ClusterDirectory.stop()`` and ``NatsLattice.close()`` (shared client) leave nothing
    behind that could act on a later connection change."""

    @defer.inlineCallbacks
    def shared_lattice(self):
        from wsprovider.lattice.nats import NatsLattice
        from wsprovider.nats import NatsClient
        client = NatsClient(self.nats.url, reactor=reactor, reconnect_max_delay=0.2)
        self.addCleanup(client.close)
        lattice = NatsLattice(client, reactor=reactor, own_client=False)
        yield lattice.start()
        yield lattice.when_connected()
        return client, lattice

    @defer.inlineCallbacks
    def outage(self, lattice):
        """Kill and restart the server; fires once the lattice has reconnected."""
        yield self.nats.kill()
        yield self.nats.start()
        yield wait_connected(lattice, True)

    @defer.inlineCallbacks
    def test_cluster_directory_stop(self):
        from types import SimpleNamespace
        from wsprovider.lattice.cluster import ClusterDirectory, ClusterDirectoryService
        client, lattice = yield self.shared_lattice()
        config = SimpleNamespace(
            instance_id=None, subject_prefix="_ws", session_joined_subject=None,
            session_left_subject=None, session_events=False, cluster_heartbeat_sec=60.0,
            cluster_list_timeout_ms=500)
        factory = SimpleNamespace(sessions={}, add_observer=lambda observer: None)
        directory = ClusterDirectory(factory, lattice, config, reactor, instance_id="stopper")
        beats = []
        publish = lattice.publish

        def recording_publish(msg):
            if msg.subject == directory.heartbeat_subject:
                beats.append(json.loads(msg.body)["state"])
            return publish(msg)
        lattice.publish = recording_publish
        heartbeats = ClusterDirectoryService(directory)
        heartbeats.startService()
        yield heartbeats.when_started()
        waiter = directory.wait_for_instance("never-seen")
        outcome = []
        waiter.addBoth(outcome.append)
        yield heartbeats.stopService()
        self.assertEqual(beats, ["alive", "bye"])
        yield self.outage(lattice)
        self.assertEqual(beats, ["alive", "bye"], "a heartbeat after bye")
        self.assertNotIn(directory._lattice_state, lattice._state_listeners)
        self.assertEqual(len(outcome), 1, "wait_for_instance still pending after stop()")

    @defer.inlineCallbacks
    def test_lattice_close_on_shared_client(self):
        client, lattice = yield self.shared_lattice()
        heard = []
        lattice.on_state_change(heard.append)
        yield lattice.close()
        yield self.nats.kill()
        yield self.nats.start()
        yield client.when_connected()
        self.assertEqual(heard, [], "a lattice callback ran after close()")
        self.assertNotIn(lattice._state_changed, client._state_listeners)
        self.assertNotIn(lattice._client_error, client._error_listeners)
