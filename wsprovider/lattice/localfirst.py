"""Local-first delivery for ``--workers``: a message stays in its worker unless another needs it.

Every worker of ``--workers N`` runs the same handlers, and on the private bus the
supervisor starts, the workers are the only clients. So for a message published in a
worker, what the other workers could want is known exactly:

* handler links: every worker has a member of each handler's queue group, so the local
  member serves the group (NATS lets any member take a message of its group);
* session addresses (``<prefix>.session.<id>``): only the session's own worker holds them
  (sessions may not subscribe to ``<prefix>.>``, and handlers are the same everywhere);
* everything else a worker subscribes to (peers' subscriptions, the broadcast and control
  subjects) is *announced* to the other workers, which keep it in an interest table.

``LocalFirstLattice`` puts a ``LocalLattice`` in front of the ``NatsLattice``: every
subscription is made on both; a publish is delivered to the local subscribers, and goes on
NATS only when another worker has announced interest in its subject (or the subject is a
session address of another worker, or nothing here wants it, or the interest table is not
synchronised yet). On NATS it carries ``Wsprovider-Origin`` (this worker ignores its own
message when NATS echoes it back) and ``Wsprovider-Served`` (the queue groups already
served here, which the other workers then skip), so every subscriber gets it once and
every queue group serves it once. A session's message to a handler and the reply to the
session therefore never touch NATS when both are in one worker.

The interest protocol (subjects ``_WSP_INTEREST.<prefix>.*``, JSON bodies):

* ``hello`` ``{"w": index, "entries": [[pattern, queue, count], ...]}``: sent at start and
  after every NATS reconnect; each other worker replaces what it knew of that worker,
  answers with its own entries, and counts it as present. The sender is synchronised once
  every other worker has answered, or after ``sync_timeout`` (a worker that does not answer
  is not running, and a worker that is not running holds no sessions).
* ``change`` ``{"w": index, "op": "+"|"-", "p": pattern, "q": queue}``: an announced
  subscription made or removed. A new subscription is confirmed (its Deferred fires, the
  peer gets ``subscribed``) only once every present worker has acknowledged it (or after
  ``sync_timeout``, with a warning): a message published anywhere after the peer saw
  ``subscribed`` reaches it.

Requests (``request``) and deliveries to sessions of other workers use NATS as before.
Only for the supervisor's private bus: with ``--nats`` other clients may share the bus, and
the workers use the plain NATS lattice.
"""

from __future__ import annotations

import collections
import json
import secrets

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from .._defer import result_if_succeeded
from ..interfaces import (IAddressedDelivery, IBoundedPayload, IClusteredLattice, IConnectionState,
                          ILattice, IStartable, ISubscription, ISynchronousDispatch)
from ..message import BrokerMessage, NotConnected
from ..subjects import SubjectTrie
from .local import LocalLattice

ORIGIN_HEADER = "Wsprovider-Origin"
SERVED_HEADER = "Wsprovider-Served"
_NOT_YET = object()


def _queues(subs) -> frozenset:
    return frozenset(s.queue for s in subs if s.queue is not None)


class InterestTable:
    """What the other workers subscribe to: (worker, pattern, queue) with counts. Sans-IO."""

    def __init__(self):
        self._trie = SubjectTrie(4096, private_first="_$")
        self._entries: dict = {}  # (worker, pattern, queue) -> [count, entry object in the trie]

    def add(self, worker, pattern: str, queue, count: int = 1) -> None:
        key = (worker, pattern, queue)
        held = self._entries.get(key)
        if held is None:
            held = self._entries[key] = [0, key]
            self._trie.insert(pattern, held[1])
        held[0] += count

    def remove(self, worker, pattern: str, queue) -> None:
        key = (worker, pattern, queue)
        held = self._entries.get(key)
        if held is None:
            return
        held[0] -= 1
        if held[0] <= 0:
            del self._entries[key]
            self._trie.remove(pattern, held[1])

    def replace(self, worker, entries) -> None:
        """Forget what ``worker`` held; it holds ``entries`` ([pattern, queue, count], ...) now."""
        for key in [k for k in self._entries if k[0] == worker]:
            held = self._entries.pop(key)
            self._trie.remove(key[1], held[1])
        for pattern, queue, count in entries:
            self.add(worker, pattern, queue, count)

    def needs(self, subject: str, served) -> bool:
        """True if another worker must get a message on ``subject`` whose queue groups in
        ``served`` were served here: a plain subscription, or a group not served."""
        entries = self._trie.match(subject)
        if not entries:
            return False
        for _worker, _pattern, queue in entries:
            if queue is None or queue not in served:
                return True
        return False

    def workers(self) -> set:
        return {k[0] for k in self._entries}


@implementer(ISubscription)
class _Subscription:
    def __init__(self, lattice, pattern, queue, local_sub, announced):
        self._lattice = lattice
        self.pattern = pattern
        self.queue = queue
        self._local = local_sub
        self._bus = None
        self._announced = announced
        self.active = True

    def unsubscribe(self):
        if not self.active:
            return defer.succeed(None)
        self.active = False
        self._local.unsubscribe()
        if self._bus is not None:
            self._bus.unsubscribe()
        return self._lattice._unsubscribed(self)


@implementer(ILattice, ISynchronousDispatch, IAddressedDelivery, IClusteredLattice, IConnectionState,
             IStartable, IBoundedPayload)
class LocalFirstLattice:
    """``ILattice`` for worker ``index`` of ``count`` on a private NATS bus (see the module doc).

    :param bus: the worker's ``NatsLattice``.
    :param service_prefix: the service's ``SUBJECT_PREFIX``.
    :param sync_timeout: seconds to wait for the other workers' answers.
    """

    log = Logger(namespace="wsprovider.lattice.localfirst")
    name = "nats+local-first"

    def __init__(self, bus, index: int, count: int, *, reactor=None, service_prefix: str = "_ws",
                 sync_timeout: float = 2.0):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.bus = bus
        self.index = index
        self.count = count
        self.sync_timeout = sync_timeout
        self.local = LocalLattice(reactor, strict=False)
        self.origin = secrets.token_hex(8)
        self._session_prefix = f"{service_prefix}.session."
        self._handler_queue_prefix = f"{service_prefix}.handlers."
        # Outside SUBJECT_PREFIX, so that a handler on "<prefix>.>" does not see the protocol.
        ctl = f"_WSP_INTEREST.{service_prefix}"
        self._hello_subject = f"{ctl}.hello"
        self._change_subject = f"{ctl}.change"
        self._reply_prefix = f"{ctl}.reply.{index}.{self.origin}."
        self.interest = InterestTable()
        self.present: set = set()       # other workers known to run (answered or said hello)
        self.synced = count <= 1
        self._mine = collections.Counter()  # (pattern, queue) announced by this worker
        self._addresses: dict = {}      # local session address -> count of its subscriptions
        self._served: dict = {}         # subject -> (local trie generation, queue groups served here)
        self._waiting: dict = {}        # reply token -> [workers still to answer, Deferred, on_answer]
        self._tokens = iter(range(1, 1 << 62))
        self._control_subs = []
        self.bus_publishes = 0          # messages this worker put on NATS (for tests and metrics)
        self.local_only = 0             # messages delivered here without NATS
        bus.inbound_filter = self._accept

    # -- capabilities delegated to the bus ----------------------------------------------

    @property
    def connected(self) -> bool:
        return self.bus.connected

    @property
    def max_payload(self) -> int:
        return self.bus.max_payload

    def add_state_listener(self, listener):
        self.bus.add_state_listener(listener)

    def remove_state_listener(self, listener):
        self.bus.remove_state_listener(listener)

    def when_connected(self):
        return self.bus.when_connected().addCallback(lambda _: self)

    def new_inbox(self) -> str:
        return self.bus.new_inbox()

    def request(self, subject, body, timeout_ms):
        return self.bus.request(subject, body, timeout_ms)

    def fail_reply(self, reply_to, error) -> bool:
        return self.local.fail_reply(reply_to, error) or self.bus.fail_reply(reply_to, error)

    # -- lifecycle ----------------------------------------------------------------------

    def start(self):
        d = self.bus.start()
        if self.count > 1:
            for subject, handler in ((self._hello_subject, self._on_hello),
                                     (self._change_subject, self._on_change),
                                     (self._reply_prefix + "*", self._on_reply)):
                self.bus.subscribe(subject, handler).addCallbacks(
                    self._control_subs.append,
                    lambda f: self.log.warn("interest protocol: could not subscribe: {e}", e=f.getErrorMessage()))
            self.bus.add_state_listener(self._bus_state)
            self.bus.when_connected().addCallback(lambda _: self._hello())
        return d.addCallback(lambda _: self)

    def close(self):
        for sub in self._control_subs:
            sub.unsubscribe()
        self._control_subs = []
        for _, d, _ in list(self._waiting.values()):
            if not d.called:
                d.callback(None)
        self._waiting.clear()
        self.local.close()
        return self.bus.close()

    def _bus_state(self, connected):
        if connected:
            self._hello()  # what happened while NATS was away may be lost: start over
        else:
            self.synced = False

    # -- subscriptions ------------------------------------------------------------------

    def _announced(self, pattern, queue) -> bool:
        return not (pattern.startswith(self._session_prefix)
                    or (queue is not None and queue.startswith(self._handler_queue_prefix)))

    def subscribe(self, pattern, callback, queue=None, on_status=None):
        local_d = self.local.subscribe(pattern, callback, queue)
        local_sub = result_if_succeeded(local_d, _NOT_YET)
        if local_sub is _NOT_YET or local_sub is None:
            return local_d  # refused (bad pattern, closed): the local lattice says why
        announced = self.count > 1 and self._announced(pattern, queue)
        sub = _Subscription(self, pattern, queue, local_sub, announced)
        if pattern.startswith(self._session_prefix):
            address = self._address_of(pattern)
            self._addresses[address] = self._addresses.get(address, 0) + 1
        bus_d = self.bus.subscribe(pattern, callback, queue, on_status)

        def on_bus(bus_sub):
            sub._bus = bus_sub
            if not sub.active:
                bus_sub.unsubscribe()
            return sub

        def failed(failure):
            local_sub.unsubscribe()
            if pattern.startswith(self._session_prefix):
                self._forget_address(self._address_of(pattern))
            return failure

        bus_d.addCallbacks(on_bus, failed)
        if not announced:
            return bus_d
        self._mine[(pattern, queue)] += 1
        acked = self._announce("+", pattern, queue)
        return defer.gatherResults([bus_d, acked], consumeErrors=True).addCallbacks(
            lambda results: results[0], lambda f: f.value.subFailure)

    def _unsubscribed(self, sub):
        pattern, queue = sub.pattern, sub.queue
        if pattern.startswith(self._session_prefix):
            self._forget_address(self._address_of(pattern))
        if sub._announced:
            key = (pattern, queue)
            self._mine[key] -= 1
            if self._mine[key] <= 0:
                del self._mine[key]
            self._announce("-", pattern, queue)  # no need to wait: extra NATS traffic is safe
        return defer.succeed(None)

    def _address_of(self, pattern: str) -> str:
        rest = pattern[len(self._session_prefix):]
        return self._session_prefix + rest.split(".", 1)[0]

    def _forget_address(self, address):
        n = self._addresses.get(address, 0) - 1
        if n <= 0:
            self._addresses.pop(address, None)
        else:
            self._addresses[address] = n

    # -- publishing ---------------------------------------------------------------------

    def publish(self, msg: BrokerMessage):
        d = self.dispatch(msg)
        return defer.succeed(None) if d is None else d

    def dispatch(self, msg: BrokerMessage):
        """Deliver here; put on NATS only what another worker needs (module doc)."""
        subject = msg.subject
        local = self.local
        subs = local._match(subject)
        if not subs:
            self.bus_publishes += 1
            return self.bus.publish(msg)  # nothing here: NATS semantics (no responders etc.)
        if subject.startswith(self._session_prefix):
            # Session addresses are never announced: only the session's worker wants them.
            if subject in self._addresses or self._address_of(subject) in self._addresses:
                self.local_only += 1
                return local.dispatch(msg, subs)
            return self._both(msg, subs)
        generation = local._subs._generation  # bumped by every local subscribe/unsubscribe
        cached = self._served.get(subject)
        if cached is not None and cached[0] == generation:
            served = cached[1]
        else:
            if len(self._served) >= 4096:
                self._served.clear()
            served = _queues(subs)
            self._served[subject] = (generation, served)
        if self.synced and not self.interest.needs(subject, served):
            self.local_only += 1
            return local.dispatch(msg, subs)
        return self._both(msg, subs)

    def _both(self, msg, subs):
        """Here and on NATS, telling the others which queue groups were served here."""
        self.bus_publishes += 1
        headers = {ORIGIN_HEADER: self.origin}
        served = _queues(subs)
        if served:
            headers[SERVED_HEADER] = " ".join(sorted(served))
        sent = self.bus.publish(msg, headers)
        local = self.local.dispatch(msg)
        if local is None:
            return sent
        return defer.gatherResults([sent, local], consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure)

    def publish_to_address(self, address: str, msg: BrokerMessage, timeout_ms: int = 5000):
        if address not in self._addresses:
            return self.bus.publish_to_address(address, msg, timeout_ms)
        for sub in self.local._match(address):
            if sub.active and sub.pattern == address:
                try:
                    result = sub.callback(msg)
                except Exception as e:
                    return defer.fail(e)
                return result if isinstance(result, defer.Deferred) else defer.succeed(None)
        return defer.fail(NotConnected(f"nothing is subscribed to {address!r}"))

    def _accept(self, queue, headers) -> bool:
        """The bus's inbound filter: not our own message back, not a group served already."""
        if headers.get(ORIGIN_HEADER) == self.origin:
            return False
        served = headers.get(SERVED_HEADER)
        return not (queue is not None and served and queue in served.split(" "))

    # -- the interest protocol ----------------------------------------------------------

    def _entries(self):
        return [[p, q, n] for (p, q), n in self._mine.items()]

    def _send(self, subject, body: dict, token=None):
        reply = self._reply_prefix + str(token) if token is not None else None
        d = self.bus.publish(BrokerMessage(subject, json.dumps(body).encode(), reply))
        d.addErrback(lambda f: self.log.debug("interest protocol: {subject} not sent: {e}",
                                              subject=subject, e=f.getErrorMessage()))

    def _expect(self, workers: set, on_answer=None) -> tuple:
        """A token for answers from ``workers``; its Deferred fires when all answered or at the timeout."""
        token = next(self._tokens)
        d = defer.Deferred()
        entry = [set(workers), d, on_answer]
        self._waiting[token] = entry
        if not workers:
            del self._waiting[token]
            d.callback(True)
            return token, d

        def timed_out():
            if self._waiting.pop(token, None) is not None and not d.called:
                d.callback(False)
        call = self._reactor.callLater(self.sync_timeout, timed_out)
        d.addBoth(lambda r: (call.cancel() if call.active() else None, r)[1])
        return token, d

    def _hello(self):
        self.synced = False
        others = set(range(self.count)) - {self.index}
        token, d = self._expect(others, self._hello_answer)
        self._send(self._hello_subject, {"w": self.index, "entries": self._entries()}, token)

        def done(all_answered):
            self.synced = True
            if not all_answered:
                self.log.info("interest: synchronised without workers {missing} (not running)",
                              missing=sorted(others - self.present) or "-")
        d.addCallback(done)

    def _hello_answer(self, body):
        self.interest.replace(body["w"], body.get("entries", ()))
        self.present.add(body["w"])

    def _announce(self, op, pattern, queue):
        token, d = self._expect(set(self.present)) if op == "+" else (None, None)
        self._send(self._change_subject, {"w": self.index, "op": op, "p": pattern, "q": queue}, token)
        if d is None:
            return defer.succeed(None)

        def done(all_answered):
            if not all_answered:
                self.log.warn("interest: workers {missing} did not acknowledge the subscription to {pattern} "
                              "within {t} s; confirming it anyway", missing=sorted(self.present), pattern=pattern,
                              t=self.sync_timeout)
        return d.addCallback(done)

    def _body(self, msg):
        try:
            body = json.loads(msg.body)
        except ValueError:
            return None
        if type(body) is not dict or body.get("w") == self.index or type(body.get("w")) is not int:
            return None
        return body

    def _on_hello(self, msg):
        body = self._body(msg)
        if body is None:
            return
        self.interest.replace(body["w"], body.get("entries", ()))
        self.present.add(body["w"])
        if msg.reply_to:
            self.bus.publish(BrokerMessage(msg.reply_to, json.dumps(
                {"w": self.index, "entries": self._entries()}).encode())).addErrback(lambda f: None)

    def _on_change(self, msg):
        body = self._body(msg)
        if body is None:
            return
        worker, pattern, queue = body["w"], body.get("p"), body.get("q")
        if type(pattern) is not str:
            return
        if body.get("op") == "+":
            self.interest.add(worker, pattern, queue)
        else:
            self.interest.remove(worker, pattern, queue)
        self.present.add(worker)
        if msg.reply_to:
            self.bus.publish(BrokerMessage(msg.reply_to, json.dumps({"w": self.index}).encode())
                             ).addErrback(lambda f: None)

    def _on_reply(self, msg):
        body = self._body(msg)
        if body is None:
            return
        try:
            token = int(msg.subject.rsplit(".", 1)[1])
        except ValueError:
            return
        entry = self._waiting.get(token)
        if entry is None:
            return
        workers, d, on_answer = entry
        if on_answer is not None:
            on_answer(body)
        self.present.add(body["w"])
        workers.discard(body["w"])
        if not workers:
            del self._waiting[token]
            if not d.called:
                d.callback(True)
