"""Received messages and the NATS header block codec (``NATS/1.0`` + HTTP-like lines)."""

from typing import Mapping, Optional, Sequence, Union

HEADER_VERSION_LINE = b"NATS/1.0"
NO_RESPONDERS_STATUS = 503

HeaderValues = Union[str, Sequence[str]]


class Msg:
    """A message delivered to a subscription callback or returned by ``request``.

    ``headers`` is None for a message sent without headers, else a dict of name to value;
    a header repeated in the message has its values joined with ``", "`` there, and all
    values (in order) are in ``header_items`` and ``get_all``. ``status`` and
    ``description`` come from the header block's first line (e.g. 503 for no responders).
    """

    __slots__ = (
        "subject", "sid", "reply", "data", "headers", "header_items", "status", "description",
        "_client",
    )

    def __init__(self, subject, sid, reply, data, headers=None, header_items=None,
                 status=None, description=None, client=None):
        self.subject = subject
        self.sid = sid
        self.reply = reply
        self.data = data
        self.headers = headers
        self.header_items = header_items
        self.status = status
        self.description = description
        self._client = client

    def get_all(self, name: str) -> list:
        """All values of header ``name`` (exact name match), in the order received."""
        return [value for key, value in (self.header_items or ()) if key == name]

    def respond(self, data: bytes = b"", headers: Optional[Mapping[str, HeaderValues]] = None):
        """Publish ``data`` to this message's reply subject."""
        if not self.reply:
            raise ValueError(f"message on {self.subject!r} has no reply subject to respond to")
        return self._client.publish(self.reply, data, headers=headers)

    def __repr__(self):
        return (f"<Msg subject={self.subject!r} sid={self.sid} reply={self.reply!r} "
                f"data={self.data[:64]!r} headers={self.headers!r} status={self.status}>")


def encode_headers(headers: Mapping[str, HeaderValues]) -> bytes:
    """Encode a header mapping; a list or tuple value becomes one line per value."""
    lines = [HEADER_VERSION_LINE]
    for name, value in headers.items():
        if not name or any(c in name for c in ":\r\n ") :
            raise ValueError(f"invalid NATS header name {name!r}")
        values = (value,) if isinstance(value, str) else value
        for one in values:
            if "\r" in one or "\n" in one:
                raise ValueError(f"NATS header {name!r} value must not contain CR or LF")
            lines.append(f"{name}: {one}".encode())
    lines.append(b"")
    lines.append(b"")
    return b"\r\n".join(lines)


def decode_headers(block: bytes):
    """Decode a header block into (headers dict, items list, status, description)."""
    lines = block.split(b"\r\n")
    first = lines[0]
    status = description = None
    if not first.startswith(HEADER_VERSION_LINE):
        raise ValueError(f"header block does not start with NATS/1.0: {first[:40]!r}")
    rest = first[len(HEADER_VERSION_LINE):].strip()
    if rest:
        code, _, text = rest.partition(b" ")
        status = int(code)
        description = text.strip().decode("utf-8", "replace") or None
    headers = {}
    items = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().decode("utf-8", "replace")
        text = value.strip().decode("utf-8", "replace")
        items.append((key, text))
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers, items, status, description
