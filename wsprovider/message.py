"""The ``wasmcloud:messaging@0.2.0`` record and its error, as Python values.

``BrokerMessage`` mirrors ``record broker-message {subject, body, reply-to}``;
``MessagingError`` is the ``string`` of ``result<_, string>``. Subclasses let Python
callers tell the common failures apart while ``str(error)`` stays the contract's text.
"""

from __future__ import annotations


class BrokerMessage:
    """One message: a subject, a body of bytes, and an optional reply subject.

    Validated on construction so that a bad value fails where it was made, not deep in
    a router or a codec.
    """

    __slots__ = ("subject", "body", "reply_to")

    def __init__(self, subject: str, body: bytes = b"", reply_to: str | None = None):
        if type(subject) is not str or not subject:
            raise TypeError(f"BrokerMessage.subject must be a non-empty str, got {subject!r}")
        if type(body) is not bytes:
            if isinstance(body, (bytearray, memoryview)):
                body = bytes(body)
            else:
                raise TypeError(
                    f"BrokerMessage.body must be bytes, got {type(body).__name__}; "
                    "encode text first (e.g. text.encode('utf-8'))"
                )
        if reply_to is not None and (type(reply_to) is not str or not reply_to):
            raise TypeError(f"BrokerMessage.reply_to must be None or a non-empty str, got {reply_to!r}")
        self.subject = subject
        self.body = body
        self.reply_to = reply_to

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BrokerMessage):
            return NotImplemented
        return (self.subject, self.body, self.reply_to) == (other.subject, other.body, other.reply_to)

    def __hash__(self) -> int:
        return hash((self.subject, self.body, self.reply_to))

    def __repr__(self) -> str:
        body = self.body if len(self.body) <= 64 else self.body[:64] + b"..."
        return f"BrokerMessage(subject={self.subject!r}, body={body!r}, reply_to={self.reply_to!r})"

    def replace(self, **changes) -> "BrokerMessage":
        values = {"subject": self.subject, "body": self.body, "reply_to": self.reply_to}
        values.update(changes)
        return BrokerMessage(**values)


class MessagingError(Exception):
    """The error side of ``result<_, string>``: ``str(err)`` is the contract's string.

    ``code`` is a short machine-readable reason, the same one used in WebSocket error
    frames (see docs/protocol.rst).
    """

    code = "error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return self.args[0]


class RequestTimeout(MessagingError):
    """A request got no reply within its timeout."""

    code = "timeout"


class NoResponders(MessagingError):
    """A request was sent to a subject that nobody listens on."""

    code = "no_responders"


class PermissionDenied(MessagingError):
    """A subject is outside what the sender is allowed to use."""

    code = "permission_denied"


class NotConnected(MessagingError):
    """The target (a session, a link, a bus) is gone or not connected."""

    code = "not_connected"


class BufferFull(MessagingError):
    """A bounded buffer is full: the message was refused, not dropped."""

    code = "buffer_full"
