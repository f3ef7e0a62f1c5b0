"""The messaging contract as zope interfaces, plus the seams between our modules.

``IMessagingConsumer`` and ``IMessageHandler`` are ``wasmcloud:messaging@0.2.0``'s
``consumer`` and ``handler``. ``ILattice`` is the subject bus the WebSocket side talks
to (in-process, NATS, ...); ``ISessionRegistry`` is what the WebSocket factories offer
to address their peers.
"""

from twisted.internet.interfaces import IPushProducer  # noqa: F401  (re-exported for server.py)
from zope.interface import Attribute, Interface


class IMessagingConsumer(Interface):
    """``wasmcloud:messaging/consumer``: what a component calls to send."""

    def publish(msg):
        """Publish a ``BrokerMessage``.

        :return: a Deferred that fires with None, or fails with ``MessagingError``.
        """

    def request(subject, body, timeout_ms):
        """Send ``body`` to ``subject`` and wait for one reply.

        :param subject: str
        :param body: bytes
        :param timeout_ms: int, milliseconds to wait for the reply
        :return: a Deferred firing with the reply ``BrokerMessage``, or failing with
            ``MessagingError`` (``RequestTimeout``, ``NoResponders``, ...).
        """


class IMessageHandler(Interface):
    """``wasmcloud:messaging/handler``: what a component implements to receive."""

    def handle_message(msg):
        """Handle one ``BrokerMessage``.

        :return: None, or a Deferred; a failure (``MessagingError`` or otherwise) is the
            ``Err`` side and is reported back to the sender where one is known.
        """


class ISubscription(Interface):
    """A live interest in a subject pattern on a lattice."""

    pattern = Attribute("The subject pattern (NATS wildcards).")

    def unsubscribe():
        """Stop delivery. Idempotent. Returns a Deferred firing when done."""


class ILattice(Interface):
    """A subject bus: where WebSocket peers and components meet.

    Subjects and patterns follow NATS: dot-separated tokens, ``*`` matches one token,
    ``>`` matches one or more trailing tokens. A pattern whose first token is a wildcard
    does not match subjects whose first token starts with ``_`` or ``$`` (MQTT's rule:
    session addresses, inboxes and control subjects are only seen by patterns naming
    their first token).

    Every implementation passes tests/test_lattice_conformance.py; what it can do beyond
    this interface is declared with the capability interfaces below.
    """

    name = Attribute("A short name for logs and metrics ('local', 'nats', ...).")

    def publish(msg):
        """Deliver ``msg`` to every matching subscription.

        :return: a Deferred firing with None once the message is handed to the bus
            (for the local lattice: once every handler has accepted it), failing with
            ``MessagingError`` when the bus refused it or a handler failed.
        """

    def request(subject, body, timeout_ms):
        """As ``IMessagingConsumer.request``, over the bus."""

    def subscribe(pattern, callback, queue=None, on_status=None):
        """Call ``callback(msg)`` for every message matching ``pattern``.

        ``callback`` may return a Deferred; its failure is the handler's error.
        With ``queue``, subscriptions sharing the queue name share the messages.

        A bus status that arrives on the subscription (NATS' 503 "no responders" for a
        message published with this subscription's subject as its reply subject) is never
        delivered to ``callback`` as data: the lattice calls ``on_status(error)`` with a
        ``MessagingError`` (``NoResponders``) instead, or drops and counts it when
        ``on_status`` is None. A lattice that reports no responders through ``publish``'s
        failure (the embedded one) may never call ``on_status``.

        :return: a Deferred firing with an ``ISubscription``.
        """

    def new_inbox():
        """Return a fresh, unguessable reply subject."""

    def fail_reply(reply_to, error):
        """Fail the local pending request waiting on ``reply_to``, if there is one.

        Called when the responder that owed the reply is gone (a session closed), so the
        requester learns at once instead of waiting for its timeout. Returns True if a
        request was failed.
        """

    def close():
        """Release the bus. Deferred."""


# -- declared lattice capabilities -------------------------------------------------------
# What a lattice can do beyond ``ILattice`` is declared with ``@implementer`` and asked with
# ``ICapability.providedBy(lattice)``; never probed with ``getattr``. The lattice
# conformance suite (tests/test_lattice_conformance.py) checks each declared capability
# and checks that a lattice without it says so.


class ISynchronousDispatch(Interface):
    """The lattice can deliver a message to in-process handlers before ``dispatch`` returns."""

    def dispatch(msg):
        """Deliver ``msg`` as ``ILattice.publish`` does.

        :return: None when every handler accepted it synchronously, else a Deferred as
            ``publish`` returns (a handler still working, or an error to report).
        """


class IAcknowledgedPublish(Interface):
    """``publish`` fires only after every matching subscriber has accepted the message:
    it fails with ``NoResponders`` when nothing matched (a strict embedded lattice) and
    with the handler's error when a handler failed.

    Without it (NATS), ``publish`` fires once the bus has the message; nobody listening
    is reported only for a message with a reply subject, to ``on_status`` of the
    subscription on that reply subject; a handler's error reaches a requester (as the
    request's failure) but not a plain publisher.
    """


class IBoundedPayload(Interface):
    """The bus carries bodies up to ``max_payload`` bytes; a larger one is refused with a
    ``MessagingError`` of code ``too_large`` and reaches no one. Without it, the lattice
    carries any body (the limits that apply are the WebSocket side's)."""

    max_payload = Attribute("The largest body in bytes (known once started).")


class IStartable(Interface):
    """The lattice must be started before use (it connects somewhere)."""

    def start():
        """Begin (returns at once; connecting may go on in the background). Deferred."""


class IAddressedDelivery(Interface):
    """The lattice can hand a message to a session at an address on whichever instance
    holds it, keeping the message's own subject and reply subject, and acknowledged."""

    def publish_to_address(address, msg, timeout_ms):
        """Deferred firing with None once the holder delivered ``msg`` to the session;
        fails with ``NoResponders`` when nobody holds ``address``."""


class IClusteredLattice(Interface):
    """The lattice spans several service instances: two lattices built on the same bus
    see each other's messages, so listing and presence need the cluster directory and a
    component linked on every instance subscribes in a queue group (one instance handles
    each message). Without it, this instance is the whole lattice."""


class IExactBroadcastCount(Interface):
    """A broadcast's count of reached sessions is known when ``publish`` fires (every
    subscriber is in this process). Without it, ``broadcast`` reports the sessions reached
    on this instance only, documented as a lower bound."""


class IConnectionState(Interface):
    """The lattice depends on a connection that can be down (NATS); readiness and metrics
    ask it. A lattice without it is always connected."""

    connected = Attribute("True while messages can flow.")

    def add_state_listener(listener):
        """Call ``listener(connected: bool)`` on every change."""

    def remove_state_listener(listener):
        """Stop calling ``listener``."""

    def when_connected():
        """Deferred firing with the lattice once messages can flow (at once if they can)."""


def when_lattice_connected(lattice):
    """Deferred firing once ``lattice`` can carry messages (at once without ``IConnectionState``)."""
    from twisted.internet import defer
    return lattice.when_connected() if IConnectionState.providedBy(lattice) else defer.succeed(lattice)


def lattice_connected(lattice) -> bool:
    """Whether messages can flow: ``IConnectionState`` says; any other lattice always can."""
    return bool(lattice.connected) if IConnectionState.providedBy(lattice) else True


class ISessionRegistry(Interface):
    """The WebSocket sessions a factory holds (server peers or client links)."""

    def list_sessions():
        """Return a list of dicts describing each session (id, connected_at, peer, ...)."""

    def send_to_session(session_id, msg):
        """Send ``msg`` to one session. Deferred; fails with ``NotConnected``."""

    def broadcast(msg):
        """Send ``msg`` to every session, framing it once. Deferred firing with the count."""

    def disconnect(session_id, code=1000, reason=""):
        """Close one session. Deferred firing with True if it existed."""
