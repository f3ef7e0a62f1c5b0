"""wRPC over NATS ("wrpc.0.0.1", as wasmCloud 1.x hosts speak it), both directions.

One invocation, caller C and server S (see docs/wasmcloud1.rst and the captures in
tests/wasmcloud1_captures/):

1. C publishes the encoded parameter tuple (as much as fits) to
   ``{prefix}.wrpc.0.0.1.{instance}.{function}`` with its reply inbox ``R_c``.
2. S answers ``R_c`` with an empty *handshake* message whose reply subject is its own
   inbox ``R_s``; C sends the rest of the parameters to ``R_s.params``, then an empty
   message (end of parameters; always sent).
3. S publishes the encoded results to ``R_c.results`` in chunks of at most
   ``max_payload``, then an empty message. A failure (trap) is the empty message alone.
4. A handshake arriving as NATS status 503 means nobody serves the subject.

``WrpcServer`` serves functions; ``WrpcClient`` invokes them. Both share one ``Inbox``:
a single wildcard subscription ``_INBOX.<random>.>`` routing handshakes, parameter and
result streams by exact subject. Callers' inboxes of any shape are accepted (the Go
library uses ``_INBOX.<nuid>``, Rust ``_INBOX.<nuid>.<nuid>``).
"""

from __future__ import annotations

import itertools
import secrets
from typing import Callable, Mapping

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..message import MessagingError, NoResponders, RequestTimeout
from ..nats.message import HEADER_VERSION_LINE
from .values import DecodeError, IncrementalDecoder

PROTOCOL = "wrpc.0.0.1"
# Bound on one decoded parameter or result value, in bytes (a value above it is a trap).
MAX_VALUE_BYTES = 64 * 1024 * 1024
NO_RESPONDERS_STATUS = 503


def invocation_subject(prefix: str, instance: str, function: str) -> str:
    """``{prefix}.wrpc.0.0.1.{instance}.{function}``; for wasmCloud the prefix is
    ``{lattice}.{target id}`` and the instance carries its ``@version``."""
    return f"{prefix}.{PROTOCOL}.{instance}.{function}"


def header_bytes(headers: Mapping[str, str] | None) -> int:
    """The size of the NATS header block for ``headers`` (0 without headers)."""
    if not headers:
        return 0
    return len(HEADER_VERSION_LINE) + 2 + 2 + sum(len(k) + 2 + len(v) + 2 for k, v in headers.items())


def chunks(data: bytes, size: int):
    for start in range(0, len(data), size):
        yield data[start:start + size]


class WrpcError(MessagingError):
    """A wRPC invocation failed at the transport level (not a WIT ``err`` value)."""

    code = "wrpc_error"


class WrpcTrap(WrpcError):
    """The server ended the results stream without a complete value: it failed or trapped."""

    code = "trap"


class WrpcNoResponders(NoResponders):
    """Nobody serves the invocation subject (NATS status 503): the component is not running."""


class WrpcTimeout(RequestTimeout):
    """No handshake, or no results, in the time allowed."""


class Inbox:
    """One wildcard subscription for every wRPC inbox of a NATS client."""

    log = Logger()

    def __init__(self, nats, prefix: str = "_INBOX"):
        self.nats = nats
        self.root = f"{prefix}.{secrets.token_hex(11)}"
        self._ids = itertools.count(1)
        self._routes: dict[str, Callable] = {}
        self._subscription = None

    @defer.inlineCallbacks
    def start(self):
        if self._subscription is None:
            self._subscription = yield self.nats.subscribe(self.root + ".>", self._received)
        return self

    def new(self) -> str:
        return f"{self.root}.{next(self._ids)}"

    def listen(self, subject: str, callback) -> None:
        self._routes[subject] = callback

    def forget(self, *subjects: str) -> None:
        for subject in subjects:
            self._routes.pop(subject, None)

    @property
    def routes(self) -> int:
        return len(self._routes)

    def _received(self, msg):
        route = self._routes.get(msg.subject)
        if route is None:
            return None  # a late message for a finished invocation (e.g. params EOF after results)
        return route(msg)

    def stop(self):
        self._routes.clear()
        sub, self._subscription = self._subscription, None
        return sub.unsubscribe() if sub is not None else defer.succeed(None)


# -- serving ---------------------------------------------------------------------------

class Invocation:
    """What a served function's handler gets besides its parameters."""

    __slots__ = ("subject", "headers", "instance", "function")

    def __init__(self, subject, headers, instance, function):
        self.subject = subject
        self.headers = headers or {}
        self.instance = instance
        self.function = function


class _ServedCall:
    """One invocation being served: parameters in, results out."""

    def __init__(self, server, export, invocation, results_to, params_inbox):
        self.server = server
        self.export = export
        self.invocation = invocation
        self.results_to = results_to
        self.params_inbox = params_inbox
        self.decoder = IncrementalDecoder(export.params_type, limit=MAX_VALUE_BYTES)
        self.started = False
        self.params_ended = False
        self.answered = False
        self.timer = server.reactor.callLater(server.params_timeout, self._expired)

    def feed(self, data: bytes):
        if self.params_ended:
            return
        if not data:
            self.params_ended = True
            if not self.started:
                self._trap("the parameters ended before a complete value")
            self._maybe_done()
            return
        if self.started:
            self._trap("parameter bytes after a complete value")
            return
        try:
            complete = self.decoder.feed(data)
        except DecodeError as error:
            self._trap(f"bad parameters: {error}")
            return
        if complete:
            if self.decoder.used != self.decoder.buffered:
                self._trap("parameter bytes after a complete value")
                return
            self.started = True
            d = defer.maybeDeferred(self.export.handler, self.decoder.value, self.invocation)
            d.addCallbacks(self._answer, self._failed)

    def _answer(self, value):
        if self.answered:
            return
        try:
            data = self.export.results_type.encode(value)
        except (TypeError, ValueError) as error:
            self._trap(f"the handler returned a value that does not encode: {error}")
            return
        self.answered = True
        self.server.send_stream(self.results_to, data)
        self._maybe_done()

    def _failed(self, failure):
        self._trap(failure.getErrorMessage(), failure if not failure.check(WrpcError) else None)

    def _trap(self, reason: str, failure: Failure | None = None):
        if self.answered:
            return
        self.answered = True
        inv = self.invocation
        if failure is not None and not failure.check(MessagingError):
            self.server.log.failure("wRPC {instance}.{function} failed", failure,
                                    instance=inv.instance, function=inv.function)
        else:
            self.server.log.warn("wRPC {instance}.{function} failed: {reason}",
                                 instance=inv.instance, function=inv.function, reason=reason)
        self.server.traps += 1
        self.server.send_stream(self.results_to, b"")
        self._maybe_done()

    def _maybe_done(self):
        if self.answered and self.params_ended:
            self._finish()

    def _expired(self):
        self.timer = None
        if not self.answered and not self.started:
            self._trap(f"the parameters did not arrive within {self.server.params_timeout:g}s")
        self._finish()  # an answer is already out (or on its way); stop waiting for the params EOF

    def _finish(self):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.server.inbox.forget(self.params_inbox)
        self.server.calls.discard(self)


class _Export:
    __slots__ = ("instance", "function", "params_type", "results_type", "handler")

    def __init__(self, instance, function, params_type, results_type, handler):
        self.instance = instance
        self.function = function
        self.params_type = params_type
        self.results_type = results_type
        self.handler = handler


class WrpcServer:
    """Serves functions on ``{prefix}.wrpc.0.0.1.{instance}.{function}``.

    ``handler(params: tuple, invocation: Invocation)`` returns the results value (or a
    Deferred of it); raising or failing is a trap (the caller sees the empty results
    message only).
    """

    log = Logger()

    def __init__(self, nats, inbox: Inbox, reactor, params_timeout: float = 10.0):
        self.nats = nats
        self.inbox = inbox
        self.reactor = reactor
        self.params_timeout = params_timeout
        self.calls: set[_ServedCall] = set()
        self.subscriptions = []
        self.traps = 0
        self.served = 0

    @defer.inlineCallbacks
    def serve(self, prefix, instance, function, params_type, results_type, handler, queue: str | None = None):
        export = _Export(instance, function, params_type, results_type, handler)
        subject = invocation_subject(prefix, instance, function)
        sub = yield self.nats.subscribe(subject, lambda msg: self._invoked(export, msg), queue)
        self.subscriptions.append(sub)
        return sub

    def _invoked(self, export, msg):
        if not msg.reply:
            self.log.warn("wRPC invocation on {subject} without a reply subject: dropped", subject=msg.subject)
            return
        self.served += 1
        params_inbox = self.inbox.new()
        call = _ServedCall(self, export, Invocation(msg.subject, msg.headers, export.instance, export.function),
                           msg.reply + ".results", params_inbox + ".params")
        self.calls.add(call)
        self.inbox.listen(call.params_inbox, lambda m: call.feed(m.data))
        self._publish(msg.reply, b"", reply=params_inbox)  # the handshake
        call.feed(msg.data)

    def send_stream(self, subject: str, data: bytes) -> None:
        """``data`` in chunks of at most max_payload, then the empty end-of-stream message."""
        for chunk in chunks(data, self.nats.max_payload):
            self._publish(subject, chunk)
        self._publish(subject, b"")

    def _publish(self, subject, data, reply=None, headers=None):
        d = self.nats.publish(subject, data, reply, headers)
        d.addErrback(lambda f: self.log.warn("wRPC publish to {subject} failed: {error}",
                                             subject=subject, error=f.getErrorMessage()))

    @defer.inlineCallbacks
    def stop(self):
        subs, self.subscriptions = self.subscriptions, []
        for sub in subs:
            yield sub.unsubscribe()
        for call in list(self.calls):
            call._finish()


# -- invoking --------------------------------------------------------------------------

class _OutgoingCall:
    def __init__(self, client, subject, reply, params, results_type, handshake_timeout, results_timeout):
        self.client = client
        self.subject = subject
        self.reply = reply
        self.results_subject = reply + ".results"
        self.params = params
        self.results_type = results_type
        self.results_timeout = results_timeout
        self.decoder = IncrementalDecoder(results_type, limit=MAX_VALUE_BYTES)
        self.result = defer.Deferred(lambda _d: self._finish())
        self.timer = client.reactor.callLater(handshake_timeout, self._timed_out, "handshake", handshake_timeout)
        self.shook = False

    def handshake(self, msg):
        if self.shook:
            return
        self.shook = True
        if msg.status is not None and not 200 <= msg.status < 300:
            if msg.status == NO_RESPONDERS_STATUS:
                self._fail(WrpcNoResponders(f"no responders for {self.subject}: the target is not running "
                                            "or not linked to this lattice"))
            elif msg.status == 408:
                self._fail(WrpcTimeout(f"wRPC handshake on {self.subject} timed out (NATS status 408)"))
            else:
                self._fail(WrpcError(f"wRPC handshake on {self.subject} failed with NATS status {msg.status}"))
            return
        if not msg.reply:
            self._fail(WrpcError(f"wRPC handshake on {self.subject} without a reply subject (protocol error)"))
            return
        self._reset_timer("results", self.results_timeout)
        params_subject = msg.reply + ".params"
        for chunk in chunks(self.params, self.client.nats.max_payload):
            self.client.publish(params_subject, chunk)
        self.client.publish(params_subject, b"")  # end of parameters, always sent
        self.params = b""

    def results(self, msg):
        if self.result.called:
            return
        if not msg.data:
            self._fail(WrpcTrap(f"{self.subject}: the results stream ended before a complete value "
                                "(the target failed or trapped)"))
            return
        try:
            complete = self.decoder.feed(msg.data)
        except DecodeError as error:
            self._fail(WrpcError(f"{self.subject}: bad results: {error}"))
            return
        if complete:
            value = self.decoder.value
            self._finish()
            self.result.callback(value)

    def _reset_timer(self, what, timeout):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = self.client.reactor.callLater(timeout, self._timed_out, what, timeout)

    def _timed_out(self, what, timeout):
        self.timer = None
        self._fail(WrpcTimeout(f"no wRPC {what} for {self.subject} within {timeout * 1000:.0f}ms"))

    def _fail(self, error):
        self._finish()
        if not self.result.called:
            self.result.errback(error)

    def _finish(self):
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.client.inbox.forget(self.reply, self.results_subject)


class WrpcClient:
    """Invokes functions served over wRPC; ``invoke`` fires with the decoded results value
    and fails with ``WrpcNoResponders``, ``WrpcTimeout``, ``WrpcTrap`` or ``WrpcError``."""

    log = Logger()

    def __init__(self, nats, inbox: Inbox, reactor, handshake_timeout: float = 2.0,
                 results_timeout: float = 10.0):
        self.nats = nats
        self.inbox = inbox
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.results_timeout = results_timeout

    def invoke(self, prefix, instance, function, params: bytes, results_type, headers=None,
               handshake_timeout: float | None = None, results_timeout: float | None = None):
        subject = invocation_subject(prefix, instance, function)
        reply = self.inbox.new()
        call = _OutgoingCall(self, subject, reply, params, results_type,
                             handshake_timeout or self.handshake_timeout, results_timeout or self.results_timeout)
        self.inbox.listen(reply, call.handshake)
        self.inbox.listen(call.results_subject, call.results)
        # The first message carries what fits beside its subject, reply and headers (as the
        # wrpc Go library cuts it); the rest goes to the server's .params after the handshake.
        room = max(self.nats.max_payload - len(subject) - len(reply) - header_bytes(headers), 0)
        first, call.params = params[:room], params[room:]
        sent = self.nats.publish(subject, first, reply, headers or None)
        sent.addErrback(lambda f: call._fail(WrpcError(
            f"could not send the wRPC invocation {subject}: {f.getErrorMessage()}")))
        return call.result

    def publish(self, subject, data):
        d = self.nats.publish(subject, data)
        d.addErrback(lambda f: self.log.warn("wRPC publish to {subject} failed: {error}", subject=subject,
                                             error=f.getErrorMessage()))
