"""The NATS lattice: WebSocket sessions as first-class citizens of a NATS bus.

``NatsLattice`` implements ``ILattice`` over the project's Twisted-native NATS client
(``wsprovider.nats``). It is how wsprovider meets wasmCloud 2.x, whose
``wasmcloud:messaging`` host plugin is plain core NATS, and how several wsprovider
instances share their sessions. See docs/nats.rst.

Same semantics as ``LocalLattice`` where NATS allows, with these differences:

* A plain publish to a subject nobody subscribes to is *not* an error: NATS cannot tell
  (no ``IAcknowledgedPublish``). A message published *with a reply subject* to a subject
  nobody listens on makes NATS answer the reply subject with a 503 "no responders"
  status; that status is never delivered as data: the subscription on the reply subject
  gets ``on_status(NoResponders(...))`` (or the status is dropped and counted in
  ``statuses_dropped`` when it has no ``on_status``). Requests fail with ``NoResponders``.
* A handler's failure is not reported to a plain publisher. A requester gets it as the
  request's failure when the request came from a ``NatsLattice`` (an ``_INBOX.wsp-``
  inbox, answered with ``Wsprovider-Error``); a plain NATS requester times out.
  ``publish_to_address`` is acknowledged, so it fails with the handler's error.
* Per-publisher order is NATS' own: messages from one lattice reach one subscription in
  the order they were published.
* ``NATS_SUBJECT_PREFIX`` (``subject_prefix``) maps the subjects peers and handlers use
  into a NATS namespace (``chat.x`` is ``<prefix>.chat.x`` on NATS). Subjects whose first
  token starts with ``_`` or ``$`` (session addresses, broadcast and control subjects,
  inboxes) are never prefixed.

As in ``LocalLattice`` (an MQTT rule), a subscription whose first token is a wildcard
does not receive subjects starting with ``_`` or ``$``, so a handler on ``>`` does not
see session traffic, inboxes or control messages.

Wire conventions between instances (NATS headers; wasmCloud components never see them):

* ``Wsprovider-Subject`` / ``Wsprovider-Reply-To`` on a message to a session address: the
  subject and reply subject to deliver it with (``send_to_session`` to a session on
  another instance keeps its original subject, exactly as for a local one).
* ``Wsprovider-Ack``: the receiving instance answers the NATS reply subject once the
  session has the message (empty body), or with ``Wsprovider-Error``.
* ``Wsprovider-Error: <code>`` on a reply: the request failed; the body is the text.
  Sent to our own inboxes (``_INBOX.wsp-...``) only, e.g. when a session that owed a reply
  to another instance's request disconnects.
"""

from __future__ import annotations

import itertools
import secrets

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .._defer import failure_if_failed
from ..interfaces import (IAddressedDelivery, IBoundedPayload, IClusteredLattice, IConnectionState,
                          ILattice, IStartable, ISubscription)
from ..message import (BrokerMessage, BufferFull, MessagingError, NoResponders, NotConnected,
                       PermissionDenied, RequestTimeout)
from ..nats import (BufferFullError, ConnectionClosedError, MaxPayloadError, NatsClient,
                    NatsError, NatsTimeoutError, NoRespondersError)
from ..nats.errors import AuthorizationError
from ..replies import PendingReplies
from ..subjects import SubjectError, check_pattern, check_subject

SUBJECT_HEADER = "Wsprovider-Subject"
REPLY_HEADER = "Wsprovider-Reply-To"
ACK_HEADER = "Wsprovider-Ack"
ERROR_HEADER = "Wsprovider-Error"
#: Every NatsLattice's request inboxes start with this (so others may send error replies).
INBOX_MARK = "_INBOX.wsp-"
_NO_RESPONDERS_STATUS = 503

_ERRORS_BY_CODE = {cls.code: cls for cls in (
    RequestTimeout, NoResponders, PermissionDenied, NotConnected, BufferFull)}


def error_from_code(code: str, text: str) -> MessagingError:
    cls = _ERRORS_BY_CODE.get(code)
    return cls(text) if cls is not None else MessagingError(text, code=code or None)


@implementer(ISubscription)
class NatsSubscription:
    """A lattice subscription bound to one NATS subscription."""

    __slots__ = ("pattern", "queue", "callback", "on_status", "first_wild", "active", "_sub", "_lattice")

    def __init__(self, lattice, pattern, callback, queue, on_status=None):
        self._lattice = lattice
        self.pattern = pattern
        self.queue = queue
        self.callback = callback
        self.on_status = on_status
        self.first_wild = pattern.split(".", 1)[0] in ("*", ">")
        self.active = True
        self._sub = None

    def unsubscribe(self):
        if self.active:
            self.active = False
            if self._sub is not None:
                return self._sub.unsubscribe().addErrback(lambda _: None)
        return defer.succeed(None)

    def __repr__(self):
        return f"<NatsSubscription {self.pattern!r} queue={self.queue!r} active={self.active}>"


def _request_timed_out(entry, timeout):
    return RequestTimeout(f"request timed out after {round(timeout * 1000)}ms (subject {entry.label!r})")


@implementer(ILattice, IAddressedDelivery, IClusteredLattice, IConnectionState, IStartable, IBoundedPayload)
class NatsLattice:
    """``ILattice`` over NATS.

    :param client: a ``wsprovider.nats.NatsClient`` (started by ``start()`` unless it is
        already); the lattice closes it on ``close()`` when ``own_client`` is true.
    :param subject_prefix: NATS namespace of peer-facing subjects ('' for identity).
    :param service_prefix: the service's ``SUBJECT_PREFIX`` (session addresses live at
        ``<service_prefix>.session.<id>``).
    :param buffer_bytes: the client's reconnect buffer; 0 makes publishes fail with
        ``NotConnected`` at once while NATS is unreachable.
    """

    log = Logger(namespace="wsprovider.lattice.nats")
    name = "nats"

    def __init__(self, client: NatsClient, *, reactor=None, subject_prefix: str = "",
                 service_prefix: str = "_ws", buffer_bytes: int | None = None, own_client: bool = True):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.client = client
        self.own_client = own_client
        self.subject_prefix = subject_prefix or ""
        self._prefix_dot = self.subject_prefix + "." if self.subject_prefix else ""
        self._session_prefix = f"{service_prefix}.session."
        self._buffering = (buffer_bytes if buffer_bytes is not None
                           else client.options.pending_buffer_bytes) > 0
        self._inbox_prefix = f"{INBOX_MARK}{secrets.token_hex(8)}."
        self._inbox_ids = itertools.count(1)
        # inbox -> waiting request; the entry's ``data`` is True for an acknowledged
        # publish_to_address (an empty reply means "delivered").
        self._pending = PendingReplies(reactor, timeout_error=_request_timed_out)
        #: bus statuses (NATS 503) that arrived on a subscription without ``on_status``
        self.statuses_dropped = 0
        self._inbox_sub = None
        self._closed = False
        #: ``inbound_filter(queue, headers) -> bool``: False drops a message with headers before
        #: a subscription's callback sees it (set by ``lattice.localfirst``)
        self.inbound_filter = None
        self._state_listeners = []
        self._client_listener_removers = [client.on_state_change(self._state_changed),
                                          client.on_error(self._client_error)]

    @classmethod
    def from_config(cls, config, reactor=None, name: str | None = None) -> "NatsLattice":
        """Build from a ``ProviderConfig`` (``NATS_URL``, ``NATS_CREDS``, ...)."""
        servers = [u.strip() for u in (config.nats_url or "").split(",") if u.strip()]
        if not servers:
            raise MessagingError("NATS_URL is empty; set it to nats://host:port", code="config")
        options = dict(
            name=name or "wsprovider",
            token=config.nats_token, user=config.nats_user, password=config.nats_password,
            creds_file=config.nats_creds, tls_ca_file=config.nats_tls_ca,
            tls_cert_file=config.nats_tls_cert, tls_key_file=config.nats_tls_key,
            pending_buffer_bytes=config.nats_buffer_bytes,
            max_reconnect_attempts=-1, reconnect_max_delay=2.0,
            ping_interval=20.0, max_outstanding_pings=2, drain_timeout=5.0,
        )
        client = NatsClient(servers, reactor=reactor, **{k: v for k, v in options.items() if v is not None})
        return cls(client, reactor=reactor, subject_prefix=config.nats_subject_prefix or "",
                   service_prefix=config.subject_prefix, buffer_bytes=config.nats_buffer_bytes)

    # -- lifecycle and state ------------------------------------------------------------

    def start(self):
        """Start connecting (forever, also after a failed first connect). Returns at once.

        Subscriptions and (bounded) publishes made before the connection is up are sent
        when it is. ``when_connected()`` waits for it.
        """
        if self._inbox_sub is None:
            d = self.client.subscribe(self._inbox_prefix + "*", self._on_inbox)
            d.addCallback(self._keep_inbox_sub)
            d.addErrback(self._log_failure, "could not subscribe the request inbox")
        first = self.client.start()
        first.addErrback(self._log_failure, "NATS client stopped before connecting")
        return defer.succeed(self)

    def _keep_inbox_sub(self, sub):
        self._inbox_sub = sub

    def _log_failure(self, failure, what):
        if not self._closed:
            self.log.warn("{what}: {error}", what=what, error=failure.getErrorMessage())

    @property
    def connected(self) -> bool:
        """True while the NATS connection is up (readiness)."""
        return not self._closed and self.client.is_connected

    @property
    def state(self) -> str:
        return self.client.state.value

    def when_connected(self):
        """Deferred firing with this lattice once NATS is connected."""
        d = self.client.when_connected()
        return d.addCallbacks(lambda _: self, lambda f: Failure(self._as_messaging_error(f.value, "connect")))

    @property
    def max_payload(self) -> int:
        """The NATS server's ``max_payload`` (headers included), known once connected."""
        return self.client.max_payload

    def add_state_listener(self, listener):
        """``IConnectionState``: ``listener(connected: bool)`` on every connection change."""
        self._state_listeners.append(listener)

    def remove_state_listener(self, listener):
        if listener in self._state_listeners:
            self._state_listeners.remove(listener)

    def on_state_change(self, listener):
        """``add_state_listener`` returning its remover."""
        self.add_state_listener(listener)
        return lambda: self.remove_state_listener(listener)

    def _state_changed(self, old, new):
        if new.value == "reconnecting":
            self.log.warn("NATS connection lost; sessions stay open, publishes are {how} until it is back",
                          how="buffered (bounded)" if self._buffering else "refused")
        elif new.value == "connected" and old.value == "reconnecting":
            self.log.info("NATS connection is back; subscriptions restored")
        for listener in list(self._state_listeners):
            try:
                listener(self.connected)
            except Exception:
                self.log.failure("NATS lattice state listener raised")

    def _client_error(self, error):
        self.log.warn("NATS: {error}", error=error)

    def close(self):
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        self._pending.close(NotConnected("the lattice was shut down before a reply arrived"))
        if not self.own_client:  # the shared client lives on: leave nothing of ours on it
            removers, self._client_listener_removers = self._client_listener_removers, []
            for remove in removers:
                remove()
            if self._inbox_sub is not None:
                self._inbox_sub.unsubscribe()
            return defer.succeed(None)
        return self.client.drain().addErrback(lambda f: self.client.close())

    # -- subjects -----------------------------------------------------------------------

    def _outer(self, subject: str) -> str:
        """Peer-facing subject -> NATS subject."""
        if not self._prefix_dot or subject[0] in "_$":
            return subject
        return self._prefix_dot + subject

    def _inner(self, subject: str) -> str:
        """NATS subject -> peer-facing subject."""
        if self._prefix_dot and subject.startswith(self._prefix_dot):
            return subject[len(self._prefix_dot):]
        return subject

    def _unavailable(self):
        if self._closed:
            return NotConnected("the NATS lattice is shut down")
        if not self._buffering and not self.client.is_connected:
            return NotConnected(f"NATS is not connected ({self.client.state.value}); the message was not sent "
                                "(NATS_BUFFER_BYTES is 0, so nothing is buffered); retry later")
        return None

    def _as_messaging_error(self, error, subject) -> MessagingError:
        if isinstance(error, MessagingError):
            return error
        if isinstance(error, BufferFullError):
            return BufferFull(f"NATS is not connected and the buffer of {error.limit} bytes is full; "
                              f"the message to {subject!r} was not sent; retry later")
        if isinstance(error, MaxPayloadError):
            return MessagingError(f"the message to {subject!r} is {error.size} bytes, over the NATS server's "
                                  f"max_payload of {error.limit} bytes", code="too_large")
        if isinstance(error, NoRespondersError):
            return NoResponders(f"no responders for subject {subject!r}")
        if isinstance(error, (ConnectionClosedError,)):
            return NotConnected(f"the NATS connection is closed; the message to {subject!r} was not sent")
        if isinstance(error, AuthorizationError):
            return PermissionDenied(f"NATS refused {subject!r}: {error.server_message}")
        if isinstance(error, NatsTimeoutError):
            return RequestTimeout(str(error))
        if isinstance(error, (SubjectError, ValueError)):
            return MessagingError(f"invalid subject {subject!r}: {error}", code="bad_subject")
        if isinstance(error, NatsError):
            return MessagingError(f"NATS error for {subject!r}: {error}", code="nats_error")
        return MessagingError(f"sending to {subject!r} failed: {error}", code="internal_error")

    def _mapped(self, d, subject):
        return d.addErrback(lambda f: Failure(self._as_messaging_error(f.value, subject)))

    # -- publish / subscribe ------------------------------------------------------------

    def publish(self, msg: BrokerMessage, headers: dict | None = None):
        """``ILattice.publish``; ``headers`` (NATS headers) for wrappers such as
        ``lattice.localfirst`` that tell instances something about the message."""
        problem = self._unavailable()
        if problem is not None:
            return defer.fail(problem)
        reply_to = msg.reply_to
        d = self.client.publish(self._outer(msg.subject), msg.body,
                                self._outer(reply_to) if reply_to is not None else None, headers)
        return self._mapped(d, msg.subject)

    def subscribe(self, pattern, callback, queue=None, on_status=None):
        try:
            check_pattern(pattern)
        except SubjectError as e:
            return defer.fail(MessagingError(str(e), code="bad_subject"))
        if self._closed:
            return defer.fail(NotConnected("the NATS lattice is shut down"))
        record = NatsSubscription(self, pattern, callback, queue, on_status)
        d = self.client.subscribe(self._outer(pattern), lambda m: self._dispatch(record, m), queue=queue)

        def bound(sub):
            record._sub = sub
            if not record.active:  # unsubscribed before the server confirmed
                sub.unsubscribe()
            return record

        d.addCallback(bound)
        return self._mapped(d, pattern)

    def _dispatch(self, record, nmsg):
        if not record.active:
            return None
        if nmsg.status is not None:
            return self._status(record, nmsg)
        headers = nmsg.headers
        if headers is not None and self.inbound_filter is not None and not self.inbound_filter(record.queue, headers):
            return None
        ack_to = None
        if headers is not None and SUBJECT_HEADER in headers and nmsg.subject.startswith(self._session_prefix):
            subject = headers[SUBJECT_HEADER]
            reply_to = headers.get(REPLY_HEADER) or None
            if ACK_HEADER in headers:
                ack_to = nmsg.reply
        else:
            subject = self._inner(nmsg.subject)
            if record.first_wild and subject[0] in "_$":
                return None
            reply_to = self._inner(nmsg.reply) if nmsg.reply else None
        try:
            msg = BrokerMessage(subject, nmsg.data, reply_to)
            result = record.callback(msg)
        except Exception as e:
            error = e if isinstance(e, MessagingError) else None
            if error is None:
                self.log.failure("handler for {subject} raised", subject=subject)
                error = MessagingError(f"handler failed: {e}", code="handler_error")
            else:
                self.log.debug("handler for {subject} refused it: {error}", subject=subject, error=error)
            self._handler_failed(ack_to, nmsg.reply, error)
            return None
        if isinstance(result, defer.Deferred):
            def done(_):
                if ack_to:
                    self._send_ack(ack_to, None)

            def failed(f):
                error = f.value if isinstance(f.value, MessagingError) else MessagingError(
                    f"handler failed: {f.getErrorMessage()}", code="handler_error")
                if not ack_to:
                    self.log.warn("messaging handler returned an error for {subject}: {error}",
                                  subject=subject, error=f.getErrorMessage())
                self._handler_failed(ack_to, nmsg.reply, error)
            return result.addCallbacks(done, failed)
        if ack_to:
            self._send_ack(ack_to, None)
        return None

    def _status(self, record, nmsg):
        """A bus status on a subscription: never data. 503 goes to ``on_status``."""
        if nmsg.status == _NO_RESPONDERS_STATUS:
            reply_subject = self._inner(nmsg.subject)
            error = NoResponders(
                f"no responders: nothing is subscribed to the subject of a message sent with reply "
                f"subject {reply_subject!r}, so it reached no one; check the subject, or start the "
                "component that serves it")
        else:
            error = MessagingError(f"NATS status {nmsg.status} on {nmsg.subject!r}: "
                                   f"{nmsg.description or ''}".rstrip(": "), code="bus_status")
        if record.on_status is None:
            self.statuses_dropped += 1
            self.log.debug("dropped {error} (the subscription on {pattern} takes no statuses)",
                           error=error, pattern=record.pattern)
            return None
        try:
            record.on_status(error)
        except Exception:
            self.log.failure("on_status for {pattern} raised", pattern=record.pattern)
        return None

    def _handler_failed(self, ack_to, reply, error):
        if ack_to:
            self._send_ack(ack_to, error)
        elif reply and reply.startswith(INBOX_MARK) and not self._closed:
            # A NatsLattice's requester understands Wsprovider-Error: tell it now
            # instead of letting it wait for its timeout.
            self._send_ack(reply, error)

    def _send_ack(self, reply, error):
        if error is None:
            d = self.client.publish(reply, b"")
        else:
            d = self.client.publish(reply, str(error).encode("utf-8"), headers={ERROR_HEADER: error.code})
        d.addErrback(lambda f: self.log.debug("could not answer {reply}: {e}", reply=reply, e=f.getErrorMessage()))

    # -- request / reply ----------------------------------------------------------------

    def new_inbox(self) -> str:
        return self._inbox_prefix + str(next(self._inbox_ids))

    def request(self, subject, body, timeout_ms):
        try:
            check_subject(subject)
        except SubjectError as e:
            return defer.fail(MessagingError(str(e), code="bad_subject"))
        return self._request(self._outer(subject), body, timeout_ms, None, subject, False)

    def publish_to_address(self, address: str, msg: BrokerMessage, timeout_ms: int = 5000):
        """Deliver ``msg`` to the session at ``address`` on whichever instance holds it.

        The session receives ``msg`` with its own subject and reply subject (carried in
        headers). Fires with None once that instance has handed it to the session; fails
        with ``NoResponders`` when no instance holds it, ``RequestTimeout``, or the
        session's error (``NotConnected``).
        """
        headers = {SUBJECT_HEADER: msg.subject, ACK_HEADER: "1"}
        if msg.reply_to is not None:
            headers[REPLY_HEADER] = msg.reply_to
        return self._request(address, msg.body, timeout_ms, headers, address, True)

    def _request(self, nats_subject, body, timeout_ms, headers, label, ack):
        problem = self._unavailable()
        if problem is not None:
            return defer.fail(problem)
        inbox = self.new_inbox()
        d = self._pending.add(inbox, timeout_ms / 1000.0, label=label, data=ack)
        sent = self.client.publish(nats_subject, body, inbox, headers)
        failure = failure_if_failed(sent)
        if failure is not None:
            sent.addErrback(lambda _: None)
            self._pending.take(inbox)
            return defer.fail(self._as_messaging_error(failure.value, label))
        return d

    def _on_inbox(self, nmsg):
        p = self._pending.take(nmsg.subject)
        if p is None:
            return
        headers = nmsg.headers
        if nmsg.status == _NO_RESPONDERS_STATUS and not nmsg.data:
            if p.data:
                p.deferred.errback(NoResponders(f"nothing is subscribed to {p.label!r}"))
            else:
                p.deferred.errback(NoResponders(f"no responders for subject {p.label!r}"))
        elif headers is not None and ERROR_HEADER in headers:
            p.deferred.errback(error_from_code(headers[ERROR_HEADER], nmsg.data.decode("utf-8", "replace")))
        elif p.data:
            p.deferred.callback(None)
        else:
            p.deferred.callback(BrokerMessage(self._inner(nmsg.subject), nmsg.data,
                                              self._inner(nmsg.reply) if nmsg.reply else None))

    def fail_reply(self, reply_to: str, error: MessagingError) -> bool:
        """Fail the request waiting on ``reply_to``: here, or on another wsprovider instance."""
        if self._pending.fail(reply_to, error):
            return True
        if reply_to.startswith(INBOX_MARK) and not self._closed:
            d = self.client.publish(reply_to, str(error).encode("utf-8"), headers={ERROR_HEADER: error.code})
            d.addErrback(lambda _: None)
            return True
        return False
