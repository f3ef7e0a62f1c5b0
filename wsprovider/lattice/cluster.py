"""The cross-instance session directory: cluster-wide ``list_sessions``, heartbeats, events.

Several wsprovider instances on one NATS bus form a cluster without any configuration:

* every instance answers ``<prefix>.ctl.sessions`` requests with its own sessions, so
  ``list_sessions()`` here is a scatter/gather: publish once with a fresh inbox, collect
  the answers, stop when every live instance has answered or after
  ``CLUSTER_LIST_TIMEOUT_MS``;
* every instance publishes a heartbeat on ``<prefix>.ctl.heartbeat`` every
  ``CLUSTER_HEARTBEAT_SEC`` (and a ``bye`` when it stops); an instance silent for three
  intervals is no longer waited for. A crashed instance does not answer, so its sessions
  are absent from the next listing at once; the listing waits at most
  ``CLUSTER_LIST_TIMEOUT_MS`` for it, and only during those three intervals;
* with ``SESSION_EVENTS``, each session's join and leave is published as JSON.

It only uses ``ILattice``, so it works on the embedded lattice too (where it is alone).
"""

from __future__ import annotations

import json
import secrets
import time

from twisted.application import service
from twisted.application.internet import TimerService
from twisted.internet import defer
from twisted.logger import Logger

from .._defer import Outcome
from ..interfaces import IClusteredLattice, IConnectionState
from ..message import BrokerMessage

_MISSED_HEARTBEATS = 3


class ClusterDirectory:
    """Session directory of one instance, on a shared lattice.

    :param factory: the server factory (``sessions``, ``add_observer``).
    """

    log = Logger(namespace="wsprovider.cluster")

    def __init__(self, factory, lattice, config, reactor, instance_id: str | None = None):
        self.factory = factory
        self.lattice = lattice
        self.config = config
        self.reactor = reactor
        self.instance_id = instance_id or config.instance_id or secrets.token_urlsafe(6)
        prefix = config.subject_prefix
        self.list_subject = f"{prefix}.ctl.sessions"
        self.heartbeat_subject = f"{prefix}.ctl.heartbeat"
        self.joined_subject = config.session_joined_subject or f"{prefix}.events.session.joined"
        self.left_subject = config.session_left_subject or f"{prefix}.events.session.left"
        self.events = config.session_events
        self.heartbeat_sec = config.cluster_heartbeat_sec
        self.clustered = IClusteredLattice.providedBy(lattice)
        #: instance id -> monotonic deadline after which it is considered gone
        self.instances: dict[str, float] = {}
        self._subs = []
        self._started = False
        self._instance_waiters: dict[str, list] = {}
        self._watching_state = False
        #: what the last cluster-wide listing saw: {"answered": [...], "missing": [...]}
        self.last_listing = None

    # -- lifecycle ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        """Answer listings and hear heartbeats. The heartbeats themselves are sent by
        ``ClusterDirectoryService`` (a ``TimerService`` calling ``beat``)."""
        self._started = True
        self.factory.add_observer(self)
        self._subs.append((yield self.lattice.subscribe(self.list_subject, self._answer_listing)))
        if self.clustered:
            self._subs.append((yield self.lattice.subscribe(self.heartbeat_subject, self._heard)))
            if IConnectionState.providedBy(self.lattice):
                self.lattice.add_state_listener(self._lattice_state)
                self._watching_state = True
        return self

    @defer.inlineCallbacks
    def stop(self):
        # First, so a reconnect from here on cannot announce this instance alive again.
        if self._watching_state:
            self._watching_state = False
            self.lattice.remove_state_listener(self._lattice_state)
        waiters, self._instance_waiters = self._instance_waiters, {}
        for instance_waiters in waiters.values():
            for waiter in instance_waiters:
                waiter.errback(defer.CancelledError("the cluster directory stopped"))
        if self._started and self.clustered:
            yield self._beat("bye")
        self._started = False
        subs, self._subs = self._subs, []
        for sub in subs:
            yield sub.unsubscribe()

    def _lattice_state(self, connected):
        if connected:  # back from an outage: say so at once rather than at the next beat
            self._beat("alive")

    # -- heartbeats ---------------------------------------------------------------------

    def beat(self):
        """Say this instance is alive (every ``CLUSTER_HEARTBEAT_SEC``). Deferred."""
        return self._beat("alive")

    def _beat(self, state):
        body = json.dumps({"instance": self.instance_id, "state": state, "interval": self.heartbeat_sec,
                           "sessions": len(self.factory.sessions)}).encode()
        d = self.lattice.publish(BrokerMessage(self.heartbeat_subject, body))
        return d.addErrback(lambda f: self.log.debug("heartbeat not sent: {e}", e=f.getErrorMessage()))

    def _heard(self, msg):
        try:
            beat = json.loads(msg.body)
            instance = str(beat["instance"])
            interval = float(beat.get("interval") or self.heartbeat_sec)
        except (ValueError, KeyError, TypeError):
            return
        if beat.get("state") == "bye":
            self.instances.pop(instance, None)
        else:
            self.instances[instance] = time.monotonic() + _MISSED_HEARTBEATS * interval
            for waiter in self._instance_waiters.pop(instance, ()):
                waiter.callback(instance)

    def wait_for_instance(self, instance_id: str):
        """Deferred firing once ``instance_id`` is known to be alive (heard its heartbeat)."""
        if instance_id == self.instance_id or instance_id in self.live_instances():
            return defer.succeed(instance_id)
        d = defer.Deferred()
        self._instance_waiters.setdefault(instance_id, []).append(d)
        return d

    def live_instances(self) -> set:
        now = time.monotonic()
        for instance, deadline in list(self.instances.items()):
            if deadline < now:
                del self.instances[instance]
        live = set(self.instances)
        live.add(self.instance_id)
        return live

    # -- listing ------------------------------------------------------------------------

    def local_sessions(self) -> list:
        sessions = []
        for session in list(self.factory.sessions.values()):
            entry = session.describe()
            entry["instance"] = self.instance_id
            sessions.append(entry)
        return sessions

    def _answer_listing(self, msg):
        if msg.reply_to is None:
            return None
        body = json.dumps({"instance": self.instance_id, "sessions": self.local_sessions()}).encode()
        return self.lattice.publish(BrokerMessage(msg.reply_to, body)).addErrback(
            lambda f: self.log.debug("listing answer not sent: {e}", e=f.getErrorMessage()))

    @defer.inlineCallbacks
    def list_sessions(self, timeout_ms: int | None = None):
        """Every session of every live instance (each dict has an ``instance`` key).

        Bounded by ``timeout_ms`` (default ``CLUSTER_LIST_TIMEOUT_MS``). Instances that did
        not answer in time are left out and named in ``last_listing["missing"]``.
        """
        if not self.clustered:
            self.last_listing = {"answered": [self.instance_id], "missing": []}
            return self.local_sessions()
        timeout_ms = timeout_ms or self.config.cluster_list_timeout_ms
        expected = self.live_instances()
        answers: dict[str, list] = {}
        done = defer.Deferred()

        def answered(msg):
            try:
                data = json.loads(msg.body)
                answers[str(data["instance"])] = list(data["sessions"])
            except (ValueError, KeyError, TypeError):
                return
            if expected <= set(answers) and not done.called:
                done.callback(None)

        inbox = self.lattice.new_inbox()
        sub = yield self.lattice.subscribe(inbox, answered)
        timer = self.reactor.callLater(timeout_ms / 1000.0, lambda: done.called or done.callback(None))
        try:
            yield self.lattice.publish(BrokerMessage(self.list_subject, b"", inbox))
            yield done
        finally:
            if timer.active():
                timer.cancel()
            sub.unsubscribe()
        self.last_listing = {"answered": sorted(answers), "missing": sorted(expected - set(answers))}
        sessions = []
        for instance in sorted(answers):
            sessions.extend(answers[instance])
        return sessions

    # -- session events (factory observer) ----------------------------------------------

    def _event(self, session, kind, **extra):
        body = {"event": kind, "session_id": session.session_id, "address": session.address,
                "instance": self.instance_id, "peer": session.peer, "subprotocol": session.subprotocol,
                "connected_at": session.connected_at, "time": time.time()}
        body.update(extra)
        subject = self.joined_subject if kind == "joined" else self.left_subject
        d = self.lattice.publish(BrokerMessage(subject, json.dumps(body).encode()))
        d.addErrback(lambda f: self.log.debug("session event not published: {e}", e=f.getErrorMessage()))

    def session_opened(self, session):
        if self.events:
            self._event(session, "joined")

    def session_closed(self, session, code, reason):
        if self.events:
            self._event(session, "left", code=code, reason=reason or "")


class ClusterDirectoryService(TimerService):
    """The directory as a service: on a clustered lattice a ``TimerService`` sends its
    heartbeats (the first at once); on stop the timer ends first, then ``bye``."""

    def __init__(self, directory: ClusterDirectory):
        TimerService.__init__(self, directory.heartbeat_sec, directory.beat)
        self.clock = directory.reactor
        self.directory = directory
        self.ready = None
        self.setName("cluster")

    def startService(self):
        self.ready = Outcome(self.directory.start())
        if self.directory.clustered:
            TimerService.startService(self)
        else:  # alone on the lattice: nobody to tell
            service.Service.startService(self)

    def when_started(self):
        return self.ready.observe()

    def stopService(self):
        if self.directory.clustered:
            d = TimerService.stopService(self)
        else:
            d = defer.maybeDeferred(service.Service.stopService, self)
        return d.addCallback(lambda _: self.directory.stop())
