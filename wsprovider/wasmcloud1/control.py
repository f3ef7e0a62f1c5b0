"""The host's control subjects, on the lattice RPC connection (``L`` lattice, ``P`` provider id):

================================================  =========  ==========================
``wasmbus.rpc.{L}.{XKEY}.linkdefs.put``            publish    InterfaceLinkDefinition
``wasmbus.rpc.{L}.{P}.linkdefs.put``               publish    (legacy copy, and pre-1.1)
``wasmbus.rpc.{L}.{P}.linkdefs.del``               publish    InterfaceLinkDefinition
``wasmbus.rpc.{L}.{P}.health``                     request    -> ``{"healthy":true,...}``
``wasmbus.rpc.{L}.{P}.default.shutdown``           request    ``{"host_id": ...}``
``wasmbus.rpc.{L}.{P}.config.update``              publish    new provider config
================================================  =========  ==========================

``ControlInterface`` parses these and calls its ``handler`` (the provider service):
``link_put(link)``, ``link_del(link)``, ``health() -> dict``, ``shutdown() -> Deferred``
(called only when ``host_id`` is ours; fires when it is safe to answer) and
``config_update(dict)``. A malformed message is logged and dropped, never fatal.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.logger import Logger

from .links import LinkDefinition, LinkError

SHUTDOWN_REPLY = b"shutting down"


def control_subjects(lattice: str, provider_id: str, link_put_key: str) -> dict:
    base = f"wasmbus.rpc.{lattice}.{provider_id}"
    puts = [f"wasmbus.rpc.{lattice}.{link_put_key}.linkdefs.put"]
    if link_put_key != provider_id:
        puts.append(f"{base}.linkdefs.put")
    return {"link_put": puts, "link_del": [f"{base}.linkdefs.del"], "health": [f"{base}.health"],
            "shutdown": [f"{base}.default.shutdown"], "config_update": [f"{base}.config.update"]}


class ControlInterface:
    log = Logger()

    def __init__(self, nats, host_data, handler):
        self.nats = nats
        self.host_data = host_data
        self.handler = handler
        self.subjects = control_subjects(host_data.lattice_rpc_prefix, host_data.provider_key,
                                         host_data.link_put_key)
        self.subscriptions = []
        self.health_checks = 0
        self.shutting_down = False

    @defer.inlineCallbacks
    def start(self):
        callbacks = {"link_put": self._link_put, "link_del": self._link_del, "health": self._health,
                     "shutdown": self._shutdown, "config_update": self._config_update}
        for name, subjects in self.subjects.items():
            for subject in subjects:
                self.subscriptions.append((yield self.nats.subscribe(subject, callbacks[name])))
        return self

    @defer.inlineCallbacks
    def stop(self):
        subs, self.subscriptions = self.subscriptions, []
        for sub in subs:
            yield sub.unsubscribe()

    def _json(self, msg, what):
        try:
            return json.loads(msg.data)
        except ValueError as error:
            self.log.warn("{what} on {subject}: not JSON ({error}); ignored", what=what, subject=msg.subject,
                          error=error)
            return None

    def _link(self, msg, what):
        obj = self._json(msg, what)
        if obj is None:
            return None
        try:
            return LinkDefinition.from_json(obj)
        except LinkError as error:
            self.log.warn("{what} on {subject}: {error}; ignored", what=what, subject=msg.subject, error=error)
            return None

    def _link_put(self, msg):
        link = self._link(msg, "link put")
        if link is not None:
            return self.handler.link_put(link)

    def _link_del(self, msg):
        link = self._link(msg, "link delete")
        if link is not None:
            return self.handler.link_del(link)

    def _health(self, msg):
        self.health_checks += 1
        if msg.reply:
            return self.nats.publish(msg.reply, json.dumps(self.handler.health()).encode())

    def _config_update(self, msg):
        obj = self._json(msg, "config update")
        if isinstance(obj, dict):
            return self.handler.config_update({str(k): str(v) for k, v in obj.items()})
        if obj is not None:
            self.log.warn("config update on {subject}: not a JSON object; ignored", subject=msg.subject)

    def _shutdown(self, msg):
        obj = self._json(msg, "shutdown")
        host_id = obj.get("host_id") if isinstance(obj, dict) else None
        if host_id != self.host_data.host_id:
            self.log.debug("shutdown for host {other} is not for us ({ours}); ignored", other=host_id,
                           ours=self.host_data.host_id)
            return None
        if not msg.reply:
            self.log.warn("shutdown request without a reply subject; ignored (the host always sends one)")
            return None
        if self.shutting_down:
            return self.nats.publish(msg.reply, SHUTDOWN_REPLY)
        self.shutting_down = True
        self.log.info("shutdown requested by host {host}", host=host_id)
        d = defer.maybeDeferred(self.handler.shutdown)
        d.addErrback(lambda f: self.log.failure("clean-up before the shutdown reply failed", f))
        d.addCallback(lambda _: self.nats.publish(msg.reply, SHUTDOWN_REPLY))
        d.addCallback(lambda _: self.nats.flush(timeout=1.0))
        d.addErrback(lambda f: self.log.warn("shutdown reply not flushed: {error}", error=f.getErrorMessage()))
        d.addBoth(lambda _: self.handler.after_shutdown_reply())
        return None
