"""Errors raised or delivered (as Failures) by the NATS client.

Every error derives from :class:`NatsError`, so callers can catch the whole family.
Messages say what happened and what the caller can do about it.
"""


class NatsError(Exception):
    """Base class of every error of the NATS client."""


class ProtocolError(NatsError):
    """The server sent bytes that are not valid NATS protocol; the connection is dropped."""


class ServerError(NatsError):
    """The server answered ``-ERR``; ``server_message`` holds its text verbatim."""

    def __init__(self, server_message: str):
        super().__init__(f"NATS server error: {server_message}")
        self.server_message = server_message


class AuthorizationError(ServerError):
    """The server rejected our credentials (or a permission); check user, token, nkey or creds."""


class ConnectionClosedError(NatsError):
    """The client was closed (or the connection went away) before the operation completed."""


class NatsTimeoutError(NatsError, TimeoutError):
    """An operation (request, flush, connect, drain) did not complete in the time allowed."""


class NoRespondersError(NatsError):
    """A request was sent to a subject that nobody subscribes to (server status 503)."""

    def __init__(self, subject: str):
        super().__init__(
            f"no responders for request on {subject!r}: nothing subscribes to that subject; "
            "start a responder or check the subject name"
        )
        self.subject = subject


class MaxPayloadError(NatsError):
    """A message is larger than the server's ``max_payload``; it was not sent."""

    def __init__(self, size: int, limit: int):
        super().__init__(
            f"message of {size} bytes exceeds the server's max_payload of {limit} bytes; "
            "split it or raise max_payload in the server configuration"
        )
        self.size = size
        self.limit = limit


class BufferFullError(NatsError):
    """While disconnected, the reconnect buffer is full; the publish was dropped."""

    def __init__(self, size: int, limit: int):
        super().__init__(
            f"disconnected from NATS and the reconnect buffer is full ({size} of {limit} bytes "
            "in use); the message was not buffered. Wait for the connection to come back or "
            "raise pending_buffer_bytes"
        )
        self.size = size
        self.limit = limit


class SlowConsumerError(NatsError):
    """A subscription's callbacks fell behind and messages were dropped."""

    def __init__(self, subject: str, sid: int, dropped: int):
        super().__init__(
            f"slow consumer on {subject!r} (sid {sid}): {dropped} message(s) dropped because "
            "its callbacks have too many messages in flight; speed up the callback or raise "
            "pending_msgs_limit / pending_bytes_limit"
        )
        self.subject = subject
        self.sid = sid
        self.dropped = dropped


class StaleConnectionError(NatsError):
    """The server stopped answering our PINGs; the connection is dropped and re-established."""
