"""``Wasmcloud1Lattice``: where WebSocket sessions meet the components of a 1.x lattice.

In wasmCloud 1.x a provider does not share a bus with components: the host reaches it by
wRPC invocations, and it reaches components by invoking their exports. So the subject bus
the WebSocket side publishes to is in this process (an in-process ``LocalLattice``), and
the linked components take part in it through wRPC:

* a handler link subscribes a ``RemoteComponent`` (``component(id)``), an
  ``IMessageHandler`` whose ``handle_message`` invokes the component's
  ``wasmcloud:messaging/handler.handle-message``;
* a component's ``consumer.publish`` / ``consumer.request`` (served by ``service``) are
  ``publish`` / ``request`` on this lattice, so they reach sessions by address.

Declared capabilities: ``IConnectionState`` (components are reachable only while the
lattice RPC NATS connection is up) and ``IExactBroadcastCount`` (every session is in this
process). Not clustered: one provider instance is one bus, as each host runs its own
instance of a provider.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from ..interfaces import (IAcknowledgedPublish, IConnectionState, IExactBroadcastCount, ILattice,
                          IMessageHandler, ISynchronousDispatch)
from ..lattice.local import LocalLattice
from ..message import MessagingError
from . import messaging as m
from .values import Err, Ok
from .wrpc import WrpcError


@implementer(IMessageHandler)
class RemoteComponent:
    """A linked component's ``handler`` export, called over wRPC."""

    log = Logger()

    def __init__(self, client, lattice_name: str, provider_id: str, component_id: str):
        self.client = client
        self.lattice_name = lattice_name
        self.provider_id = provider_id
        self.component_id = component_id
        self.delivered = 0
        self.failed = 0

    def handle_message(self, msg):
        params = m.HANDLE_MESSAGE_PARAMS.encode((msg,))
        d = self.client.invoke(f"{self.lattice_name}.{self.component_id}", m.HANDLER, "handle-message", params,
                               m.HANDLE_MESSAGE_RESULTS,
                               headers={"source-id": self.provider_id, "target-id": self.component_id})
        d.addCallbacks(self._answered, self._failed)
        return d

    def _answered(self, result):
        if isinstance(result, Ok):
            self.delivered += 1
            return None
        self.failed += 1
        raise MessagingError(f"component {self.component_id} returned an error: {result.value}", code="handler_error")

    def _failed(self, failure):
        self.failed += 1
        failure.trap(WrpcError, MessagingError)
        self.log.warn("delivery to component {id} failed: {error}", id=self.component_id,
                      error=failure.getErrorMessage())
        return failure

    def __repr__(self):
        return f"<RemoteComponent {self.component_id} on {self.lattice_name}>"


@implementer(ILattice, IConnectionState, IExactBroadcastCount, ISynchronousDispatch, IAcknowledgedPublish)
class Wasmcloud1Lattice:
    """An ``ILattice`` over an in-process bus, with the 1.x components reachable by wRPC.

    :param wrpc_client: a ``WrpcClient`` on the lattice RPC connection (None: no component
        can be reached; ``component()`` refuses).
    :param nats: that connection's ``NatsClient``, for ``IConnectionState`` (None: always up).
    """

    name = "wasmcloud1"
    clustered = False

    def __init__(self, reactor, lattice_name: str = "default", provider_id: str = "wsprovider",
                 wrpc_client=None, nats=None):
        self._bus = LocalLattice(reactor)
        self.lattice_name = lattice_name
        self.provider_id = provider_id
        self._wrpc = wrpc_client
        self._nats = nats
        self._listeners = []
        self._remove_nats_listener = nats.on_state_change(self._nats_state) if nats is not None else None

    # -- the 1.x side -----------------------------------------------------------------

    def component(self, component_id: str) -> RemoteComponent:
        if self._wrpc is None:
            raise MessagingError("this lattice has no wRPC connection to reach components", code="not_connected")
        return RemoteComponent(self._wrpc, self.lattice_name, self.provider_id, component_id)

    # -- ILattice ---------------------------------------------------------------------

    def publish(self, msg):
        return self._bus.publish(msg)

    def dispatch(self, msg):
        # The sessions and the linked components' stand-ins share the in-process bus, so
        # delivery is as synchronous and acknowledged as on the embedded lattice.
        return self._bus.dispatch(msg)

    def request(self, subject, body, timeout_ms):
        return self._bus.request(subject, body, timeout_ms)

    def subscribe(self, pattern, callback, queue=None, on_status=None):
        # The in-process bus reports "nobody listens" through publish's failure, never as a status.
        return self._bus.subscribe(pattern, callback, queue)

    def new_inbox(self):
        return self._bus.new_inbox()

    def fail_reply(self, reply_to, error):
        return self._bus.fail_reply(reply_to, error)

    def close(self):
        if self._remove_nats_listener is not None:
            self._remove_nats_listener()
            self._remove_nats_listener = None
        closed = self._bus.close()
        listeners, self._listeners = self._listeners, []
        for listener in listeners:  # closed is a change to "not connected": say so
            listener(False)
        return closed

    # -- IConnectionState -------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._bus.connected and (self._nats is None or self._nats.is_connected)

    def add_state_listener(self, listener):
        self._listeners.append(listener)

    def when_connected(self):
        if self._nats is None or self._nats.is_connected:
            return defer.succeed(self)
        return self._nats.when_connected().addCallback(lambda _: self)

    def remove_state_listener(self, listener):
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _nats_state(self, old, new):
        for listener in list(self._listeners):
            listener(self.connected)
