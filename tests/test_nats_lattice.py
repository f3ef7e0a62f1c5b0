"""The NATS lattice with real parts: nats-server (single and 3-node cluster), several
wsprovider instances on it, real WebSocket peers, a crashing twistd instance, outages."""

import secrets
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from wsprovider import BrokerMessage, MessagingError, NotConnected
from wsprovider.lattice.nats import NatsLattice
from wsprovider.nats import NatsClient

from .natsserver import NatsServer, start_cluster
from .peers import WebsocketsPeer, start_provider, ws_url

@defer.inlineCallbacks
def start_nats_provider(testcase, url, **config):
    """A server-mode provider on the NATS lattice at ``url``, connected to NATS."""
    values = {"NATS_URL": url, "CLUSTER_HEARTBEAT_SEC": "0.2", "CLUSTER_LIST_TIMEOUT_MS": "1500"}
    values.update(config)
    handlers = values.pop("handlers", ())
    provider = yield start_provider(testcase, values, handlers=handlers)
    assert isinstance(provider.lattice, NatsLattice), provider.lattice
    yield provider.lattice.when_connected()
    return provider


@defer.inlineCallbacks
def nats_client(testcase, url):
    """An independent NATS participant (a stand-in for a component)."""
    client = NatsClient(url, reactor=reactor, name="test-component")
    testcase.addCleanup(client.close)
    yield client.start()
    return client


def wait_connected(lattice, connected: bool):
    """Fires when the lattice's NATS connection reaches ``connected`` (no polling)."""
    d = defer.Deferred()
    if lattice.connected == connected:
        d.callback(None)
        return d
    lattice.on_state_change(lambda now: now == connected and not d.called and d.callback(None))
    return d


@defer.inlineCallbacks
def settle(src, dst):
    """Wait until every subscription ``dst``'s NATS server has confirmed is known where
    ``src`` publishes.

    In a NATS cluster interest travels between nodes asynchronously. Route updates from one
    node to another are ordered, so once a fresh subscription made through ``dst`` is
    visible from ``src``, so is everything ``dst``'s node had processed before it. On a
    single server this is one round trip.
    """
    from wsprovider.message import NoResponders
    subject = "_settle." + secrets.token_hex(8)
    sub = yield dst.lattice.subscribe(
        subject, lambda m: dst.lattice.publish(BrokerMessage(m.reply_to, b"")) if m.reply_to else None)
    try:
        while True:
            try:
                yield src.lattice.request(subject, b"", 2000)
                return
            except NoResponders:
                continue
    finally:
        sub.unsubscribe()


def connect(provider, **kwargs):
    return WebsocketsPeer.connect(ws_url(provider), **kwargs)


class Collector:
    """A NATS subscription callback collecting messages; ``next()`` waits for one."""

    def __init__(self):
        self.received = []
        self._waiting = []

    def __call__(self, msg):
        self.received.append(msg)
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(msg)

    def next(self):
        d = defer.Deferred()
        self._waiting.append(d)
        return d


class TwoInstancesMixin:
    """Two wsprovider instances (A and B) on one NATS (a server or a cluster)."""

    timeout = 30

    def urls(self):
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        url_a, url_b = yield self.urls()
        self.url_a, self.url_b = url_a, url_b
        self.a = yield start_nats_provider(self, url_a, INSTANCE_ID="inst-a")
        self.b = yield start_nats_provider(self, url_b, INSTANCE_ID="inst-b")

    @defer.inlineCallbacks
    def test_peer_publish_reaches_component_and_reply_routes_back(self):
        component = yield nats_client(self, self.url_b)
        yield component.subscribe("svc.upper", lambda m: m.respond(m.data.upper()))
        yield settle(self.a, self.b)
        peer = yield connect(self.a)
        yield peer.send_json({"subject": "svc.upper", "body": "hello"})
        frame = yield peer.recv_json()
        self.assertEqual(frame, {"type": "message", "subject": peer.address, "body": "HELLO"})
        yield peer.close()

    @defer.inlineCallbacks
    def test_peer_request_reply_and_no_responders(self):
        component = yield nats_client(self, self.url_b)
        yield component.subscribe("svc.upper", lambda m: m.respond(m.data.upper()))
        yield component.subscribe("svc.slow", lambda m: None)  # never answers
        yield settle(self.a, self.b)
        peer = yield connect(self.a)
        started = time.monotonic()
        yield peer.send_json({"type": "request", "id": 1, "subject": "svc.upper", "body": "hi"})
        reply = yield peer.recv_json()
        self.round_trip_ms = (time.monotonic() - started) * 1000
        self.assertEqual((reply["type"], reply["id"], reply["body"]), ("reply", 1, "HI"))
        yield peer.send_json({"type": "request", "id": 2, "subject": "nobody.home", "body": ""})
        err = yield peer.recv_json()
        self.assertEqual((err["type"], err["code"], err["id"]), ("error", "no_responders", 2))
        yield peer.send_json({"type": "request", "id": 3, "subject": "svc.slow", "timeout_ms": 100})
        err = yield peer.recv_json()
        self.assertEqual((err["code"], err["id"]), ("timeout", 3))
        yield peer.close()

    @defer.inlineCallbacks
    def test_peer_publish_to_empty_subject_is_no_responders(self):
        """As on the embedded lattice: a ``no_responders`` error frame, and nothing else (NATS'
        503 status on the session's reply subject is never forwarded as a message)."""
        peer = yield connect(self.a)
        for reply_to in (None, peer.address + ".r1"):
            frame = {"subject": "nobody.listens", "body": "x"}
            if reply_to is not None:
                frame["reply_to"] = reply_to
            yield peer.send_json(frame)
            err = yield peer.recv_json()
            self.assertEqual((err["type"], err["code"]), ("error", "no_responders"), err)
            self.assertIn(repr(reply_to or peer.address), err["message"])
            yield peer.send_json({"type": "ping", "id": 1})
            self.assertEqual((yield peer.recv_json()), {"type": "pong", "id": 1})
        yield peer.close()

    @defer.inlineCallbacks
    def test_peer_to_peer_across_instances(self):
        pa = yield connect(self.a)
        pb = yield connect(self.b)
        yield settle(self.a, self.b)
        yield settle(self.b, self.a)
        yield pa.send_json({"subject": pb.address, "body": "hi b"})
        frame = yield pb.recv_json()
        self.assertEqual(frame, {"type": "message", "subject": pb.address, "body": "hi b",
                                 "reply_to": pa.address})
        yield pb.send_json({"subject": frame["reply_to"] + ".r1", "body": "hi a"})
        frame = yield pa.recv_json()
        self.assertEqual(frame["subject"], pa.address + ".r1")
        self.assertEqual(frame["body"], "hi a")
        yield pa.close()
        yield pb.close()

    @defer.inlineCallbacks
    def test_send_to_session_on_other_instance_keeps_subject(self):
        pb = yield connect(self.b)
        yield settle(self.a, self.b)
        yield self.a.send_to_session(pb.session_id, BrokerMessage("notification", b"only b", "reply.here"))
        frame = yield pb.recv_json()
        self.assertEqual(frame, {"type": "message", "subject": "notification", "body": "only b",
                                 "reply_to": "reply.here"})
        # Local and remote behave the same: an unknown session fails with NotConnected.
        err = yield self.assertFailure(self.a.send_to_session("nope", BrokerMessage("x", b"")), NotConnected)
        self.assertIn("no session 'nope'", str(err))
        yield pb.close()

    @defer.inlineCallbacks
    def test_component_publishes_to_session_address(self):
        component = yield nats_client(self, self.url_a)
        pb = yield connect(self.b)
        yield settle(self.a, self.b)
        yield component.publish(pb.address + ".news", b"\x00\xffbinary")
        frame = yield pb.recv_json()
        self.assertEqual(frame["subject"], pb.address + ".news")
        self.assertEqual(frame["body_base64"], "AP9iaW5hcnk=")
        yield pb.close()

    @defer.inlineCallbacks
    def test_broadcast_reaches_every_instance(self):
        peers = [(yield connect(self.a)), (yield connect(self.a)), (yield connect(self.b))]
        yield self.a.broadcast_to_clients(BrokerMessage("announcement", b"update"))
        frames = yield defer.gatherResults([p.recv_json() for p in peers])
        self.assertEqual(frames, [{"type": "message", "subject": "announcement", "body": "update"}] * 3)
        # And from any NATS participant, on <prefix>.broadcast.<subject>.
        component = yield nats_client(self, self.url_b)
        yield component.publish("_ws.broadcast.alert", b"fire")
        frames = yield defer.gatherResults([p.recv_json() for p in peers])
        self.assertEqual({f["subject"] for f in frames}, {"alert"})
        yield defer.gatherResults([p.close() for p in peers])

    @defer.inlineCallbacks
    def test_subscribe_across_instances(self):
        pa = yield connect(self.a)
        pb = yield connect(self.b)
        yield pb.subscribe("chat.>")
        yield settle(self.a, self.b)
        yield pa.send_json({"subject": "chat.room1", "body": "hi all"})
        frame = yield pb.recv_json()
        self.assertEqual(frame, {"type": "message", "subject": "chat.room1", "body": "hi all",
                                 "reply_to": pa.address})
        yield pb.send_json({"type": "unsubscribe", "subject": "chat.>", "id": 4})
        self.assertEqual((yield pb.recv_json())["type"], "unsubscribed")
        yield pa.close()
        yield pb.close()

    @defer.inlineCallbacks
    def test_queue_group_shares_messages(self):
        workers = [(yield connect(self.a)), (yield connect(self.b))]
        for w in workers:
            yield w.send_json({"type": "subscribe", "subject": "jobs.*", "queue": "workers"})
            self.assertEqual((yield w.recv_json())["type"], "subscribed")
        yield settle(self.a, self.b)
        component = yield nats_client(self, self.url_a)
        for i in range(20):
            yield component.publish(f"jobs.{i}", str(i).encode())
        got = []
        all_in = defer.Deferred()

        @defer.inlineCallbacks
        def read(w):
            while True:
                frame = yield w.recv_json()
                got.append(frame["body"])
                if len(got) == 20 and not all_in.called:
                    all_in.callback(None)

        readers = [read(w).addErrback(lambda _: None) for w in workers]
        yield all_in
        # 20 frames in all, each job once: a message given to both members would be a duplicate.
        self.assertEqual(sorted(got, key=int), [str(i) for i in range(20)])
        yield defer.gatherResults([w.close() for w in workers])
        yield defer.gatherResults(readers)

    @defer.inlineCallbacks
    def test_component_request_to_session_on_other_instance(self):
        pb = yield connect(self.b)
        yield settle(self.a, self.b)
        d = self.a.request(pb.address, b"question", 5000)
        frame = yield pb.recv_json()
        self.assertEqual(frame["body"], "question")
        self.assertTrue(frame["reply_to"].startswith("_INBOX.wsp-"))
        yield pb.send_json({"subject": frame["reply_to"], "body": "answer"})
        reply = yield d
        self.assertEqual(reply.body, b"answer")
        # A plain NATS requester (a component) gets the same.
        component = yield nats_client(self, self.url_a)
        d = component.request(pb.address, b"q2", timeout=5)
        frame = yield pb.recv_json()
        yield pb.send_json({"subject": frame["reply_to"], "body": "a2"})
        self.assertEqual((yield d).data, b"a2")
        yield pb.close()

    @defer.inlineCallbacks
    def test_session_on_other_instance_disconnects_during_request(self):
        pb = yield connect(self.b)
        yield settle(self.a, self.b)
        started = time.monotonic()
        d = self.a.request(pb.address, b"question", 20000)
        yield pb.recv_json()
        yield pb.close()
        err = yield self.assertFailure(d, NotConnected)
        self.assertIn("disconnected before replying", str(err))
        self.assertLess(time.monotonic() - started, 5)

    @defer.inlineCallbacks
    def test_request_to_session_times_out(self):
        pb = yield connect(self.b)
        yield settle(self.a, self.b)
        d = self.a.request(pb.address, b"question", 200)
        yield pb.recv_json()
        err = yield self.assertFailure(d, MessagingError)
        self.assertEqual(err.code, "timeout")
        self.assertIn("timed out after 200ms", str(err))
        yield pb.close()

    @defer.inlineCallbacks
    def test_cluster_wide_list_sessions(self):
        pa = yield connect(self.a)
        pb1 = yield connect(self.b)
        pb2 = yield connect(self.b)
        yield self.a.cluster.wait_for_instance("inst-b")
        self.assertEqual([s["session_id"] for s in self.a.list_sessions()], [pa.session_id])
        started = time.monotonic()
        sessions = yield self.a.list_sessions(cluster=True)
        elapsed = time.monotonic() - started
        self.assertEqual(sorted((s["instance"], s["session_id"]) for s in sessions),
                         sorted([("inst-a", pa.session_id), ("inst-b", pb1.session_id),
                                 ("inst-b", pb2.session_id)]))
        self.assertEqual(self.a.cluster.last_listing, {"answered": ["inst-a", "inst-b"], "missing": []})
        self.assertLess(elapsed, 1.0)  # every live instance answered: no need to wait for the bound
        yield defer.gatherResults([p.close() for p in (pa, pb1, pb2)])

    @defer.inlineCallbacks
    def test_handler_linked_on_every_instance_handles_each_message_once(self):
        seen = []
        ten = defer.Deferred()

        class Counter:
            def handle_message(self, msg):
                seen.append(msg.body)
                if len(seen) == 10:
                    ten.callback(None)

        yield self.a.receive_link_config_as_source("counter", {"SUBSCRIPTIONS": "count.>"}, handler=Counter())
        yield self.b.receive_link_config_as_source("counter", {"SUBSCRIPTIONS": "count.>"}, handler=Counter())
        yield settle(self.a, self.b)
        component = yield nats_client(self, self.url_a)
        for i in range(10):
            yield component.publish(f"count.{i}", str(i).encode())
        yield ten
        # Each of the 10 reached exactly one instance's handler (a queue group per component).
        self.assertEqual(sorted(int(s) for s in seen), list(range(10)))


class TwoInstancesOneServerTests(TwoInstancesMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def urls(self):
        self.server = NatsServer(self)
        yield self.server.start()
        return self.server.url, self.server.url


class TwoInstancesClusterTests(TwoInstancesMixin, unittest.TestCase):
    """A on node 0, B on node 2 of a 3-node nats-server cluster."""

    @defer.inlineCallbacks
    def urls(self):
        self.servers = yield start_cluster(self, size=3)
        return self.servers[0].url, self.servers[2].url
