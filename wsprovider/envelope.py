"""The WebSocket wire format, protocol v1 (docs/protocol.rst). Pure functions, no I/O.

Two codecs share one frame model, negotiated by WebSocket subprotocol:

* ``wsprovider.v1.json`` (default): JSON text frames; a body is ``body`` when it is
  UTF-8 text, ``body_base64`` otherwise; inbound ``body`` may also be an array of byte
  values (the seed's form).
* ``wsprovider.v1.msgpack``: MessagePack binary frames with the same keys; ``body`` is
  raw bytes.

Seed compatibility: a frame without ``type`` is a message; a text frame that is not
JSON is a message on subject ``message``; a binary frame in the JSON protocol is a
message on subject ``binary.message``.

The frame model, both directions: one typed class per frame kind (``Message``, ``Reply``,
``Request``, ``Subscribe``, ``Subscribed``, ``Unsubscribe``, ``Unsubscribed``, ``Ping``,
``Pong``, ``Welcome``, ``Error``), every one a ``Frame`` with the same attribute names.
A codec (``IFrameCodec``) turns any frame into ``(payload, is_binary)`` with ``encode``
and reads what a server sends with ``decode_from_server``; ``decode`` reads what a peer
sends. The server's hot path keeps its own shortcuts (``decode`` -> ``InboundFrame``,
``message``, ``error``, ``control``), which produce the same bytes as ``encode``. The
raw wire of client links (``raw.RawCodec``) is a second ``IFrameCodec`` without the
``IEnvelopeWire`` capability: its frames are bodies only.

``hops`` (message, reply and request frames; absent means 0) is the reply depth a client
link counts to cut loops with an echoing server (docs/client-mode.rst, "Loops").
"""

from __future__ import annotations

import base64
import binascii
import json
import json.encoder
import json.scanner

import msgpack
from zope.interface import Attribute, Interface, implementer

from ._accel import ACCELERATED, plain_ascii_prefix, plain_prefix
from .message import BrokerMessage
from .subjects import SubjectError, check_pattern, check_queue, check_subject

JSON_PROTOCOL = "wsprovider.v1.json"
MSGPACK_PROTOCOL = "wsprovider.v1.msgpack"
SUBPROTOCOLS = (JSON_PROTOCOL, MSGPACK_PROTOCOL)

PLAIN_TEXT_SUBJECT = "message"
PLAIN_BINARY_SUBJECT = "binary.message"

# Frame kinds a peer may send.
MESSAGE = "message"
SUBSCRIBE = "subscribe"
UNSUBSCRIBE = "unsubscribe"
REQUEST = "request"
PING = "ping"
INBOUND_KINDS = frozenset((MESSAGE, SUBSCRIBE, UNSUBSCRIBE, REQUEST, PING))
# Frame kinds a server sends.
REPLY = "reply"
WELCOME = "welcome"
ERROR = "error"
SUBSCRIBED = "subscribed"
UNSUBSCRIBED = "unsubscribed"
PONG = "pong"
SERVER_KINDS = frozenset((MESSAGE, REPLY, WELCOME, ERROR, SUBSCRIBED, UNSUBSCRIBED, PONG))

# Error codes (also used as MessagingError.code). Documented in docs/protocol.rst.
BAD_FRAME = "bad_frame"
BAD_JSON = "bad_json"


class FrameError(ValueError):
    """An inbound frame that cannot be used. The session answers with an error frame."""

    def __init__(self, message: str, code: str = BAD_FRAME, frame_id=None):
        super().__init__(message)
        self.code = code
        self.frame_id = frame_id


class IFrameCodec(Interface):
    """Frames to WebSocket messages and back."""

    name = Attribute("The subprotocol name ('raw' for plain frames).")

    def encode(frame):
        """``(payload: bytes, is_binary: bool)`` for a ``Frame``; ``FrameError`` if this wire
        cannot carry it."""

    def decode_from_server(payload, is_binary):
        """A ``Frame`` for one WebSocket message from a server, or ``FrameError``."""


class IEnvelopeWire(Interface):
    """Capability: the wire carries subjects, reply subjects, frame ids, ``hops`` and the
    control frames (welcome, subscribe, error...). The raw wire does not."""


class Frame:
    """A frame of the protocol; every kind has the same attribute names (unused ones are None)."""

    __slots__ = ()
    kind = None
    message = None      # BrokerMessage: message, reply, request
    subject = None      # subscribe, subscribed, unsubscribe, unsubscribed
    frame_id = None
    timeout_ms = None   # request
    queue = None        # subscribe
    hops = 0            # message, reply, request: reply depth (loop protection)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    __hash__ = None

    def __repr__(self):
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"


class Message(Frame):
    __slots__ = ("message", "frame_id", "hops")
    kind = MESSAGE

    def __init__(self, message: BrokerMessage, frame_id=None, hops: int = 0):
        self.message = message
        self.frame_id = frame_id
        self.hops = hops


class Reply(Message):
    __slots__ = ()
    kind = REPLY


class Request(Frame):
    __slots__ = ("message", "frame_id", "timeout_ms", "hops")
    kind = REQUEST

    def __init__(self, message: BrokerMessage, frame_id, timeout_ms=None, hops: int = 0):
        self.message = message
        self.frame_id = frame_id
        self.timeout_ms = timeout_ms
        self.hops = hops


class Subscribe(Frame):
    __slots__ = ("subject", "frame_id", "queue")
    kind = SUBSCRIBE

    def __init__(self, subject: str, frame_id=None, queue=None):
        self.subject = subject
        self.frame_id = frame_id
        self.queue = queue


class _SubjectAck(Frame):
    __slots__ = ("subject", "frame_id")

    def __init__(self, subject: str, frame_id=None):
        self.subject = subject
        self.frame_id = frame_id


class Unsubscribe(_SubjectAck):
    __slots__ = ()
    kind = UNSUBSCRIBE


class Subscribed(_SubjectAck):
    __slots__ = ()
    kind = SUBSCRIBED


class Unsubscribed(_SubjectAck):
    __slots__ = ()
    kind = UNSUBSCRIBED


class Ping(Frame):
    __slots__ = ("frame_id",)
    kind = PING

    def __init__(self, frame_id=None):
        self.frame_id = frame_id


class Pong(Ping):
    __slots__ = ()
    kind = PONG


class Welcome(Frame):
    """The server's first frame: who this session is there."""

    __slots__ = ("session_id", "reply_to", "protocol", "max_message_size")
    kind = WELCOME

    def __init__(self, session_id=None, reply_to=None, protocol=None, max_message_size=None):
        self.session_id = session_id
        self.reply_to = reply_to
        self.protocol = protocol
        self.max_message_size = max_message_size


class Error(Frame):
    __slots__ = ("code", "text", "frame_id")
    kind = ERROR

    def __init__(self, code: str, text: str, frame_id=None):
        self.code = code
        self.text = text
        self.frame_id = frame_id


_SUBJECT_FRAMES = {SUBSCRIBED: Subscribed, UNSUBSCRIBED: Unsubscribed}


class InboundFrame(Frame):
    """A decoded peer frame (``decode``, the server's hot path). ``message`` is set for
    message and request frames."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    __slots__ = ("kind", "message", "subject", "frame_id", "timeout_ms", "queue")

    def __init__(self, kind, message=None, subject=None, frame_id=None, timeout_ms=None, queue=None):
        self.kind = kind
        self.message = message
        self.subject = subject
        self.frame_id = frame_id
        self.timeout_ms = timeout_ms
        self.queue = queue

    def __repr__(self):
        return (f"InboundFrame(kind={self.kind!r}, message={self.message!r}, subject={self.subject!r}, "
                f"frame_id={self.frame_id!r})")


@implementer(IFrameCodec, IEnvelopeWire)
class _Codec:
    name: str
    is_binary: bool

    def loads(self, payload: bytes, is_binary: bool):
        raise NotImplementedError

    def dumps(self, obj) -> bytes:
        raise NotImplementedError

    def put_body(self, obj: dict, body: bytes) -> None:
        raise NotImplementedError

    def decode(self, payload: bytes, is_binary: bool) -> InboundFrame:
        """Turn one WebSocket message into an ``InboundFrame`` or raise ``FrameError``."""
        obj = self.loads(payload, is_binary)
        if obj is None:  # not ours: seed-style plain frame
            subject = PLAIN_BINARY_SUBJECT if is_binary else PLAIN_TEXT_SUBJECT
            return InboundFrame(MESSAGE, BrokerMessage(subject, payload))
        if type(obj) is not dict:
            raise FrameError(f"a frame must be an object, got {type(obj).__name__}")
        frame_id = obj.get("id")
        if frame_id is not None:
            if type(frame_id) is str:
                if not frame_id.isascii() and not _is_utf8_text(frame_id):
                    raise FrameError("'id' holds a lone surrogate, which is not UTF-8 text")
            elif not isinstance(frame_id, int):
                raise FrameError("'id' must be a string or an integer")
        kind = obj.get("type", MESSAGE)
        if kind == MESSAGE:
            return InboundFrame(MESSAGE, self._message(obj, frame_id), frame_id=frame_id)
        if kind == REQUEST:
            if frame_id is None:
                raise FrameError("a request frame needs an 'id' to match its reply")
            timeout = obj.get("timeout_ms")
            if timeout is not None and (type(timeout) is not int or timeout <= 0):
                raise FrameError("'timeout_ms' must be a positive integer", frame_id=frame_id)
            return InboundFrame(REQUEST, self._message(obj, frame_id), frame_id=frame_id, timeout_ms=timeout)
        if kind in (SUBSCRIBE, UNSUBSCRIBE):
            subject = obj.get("subject")
            try:
                check_pattern(subject)
            except SubjectError as e:
                raise FrameError(str(e), frame_id=frame_id) from None
            queue = obj.get("queue")
            if queue is not None:
                try:
                    check_queue(queue)
                except SubjectError as e:
                    raise FrameError(f"{e} (a queue name follows the rules of a subject)",
                                     frame_id=frame_id) from None
            return InboundFrame(kind, subject=subject, frame_id=frame_id, queue=queue)
        if kind == PING:
            return InboundFrame(PING, frame_id=frame_id)
        raise FrameError(
            f"unknown frame type {kind!r}; expected one of: " + ", ".join(sorted(INBOUND_KINDS)),
            frame_id=frame_id,
        )

    def _message(self, obj: dict, frame_id) -> BrokerMessage:
        subject = obj.get("subject")
        if type(subject) is not str or subject not in _valid_subjects:
            try:
                check_subject(subject)
            except SubjectError as e:
                raise FrameError(str(e), frame_id=frame_id) from None
            if len(_valid_subjects) >= _VALID_SUBJECTS_LIMIT:
                _valid_subjects.clear()
            _valid_subjects[subject] = None
        reply_to = obj.get("reply_to")
        if reply_to is not None:
            try:
                check_subject(reply_to, what="reply_to")
            except SubjectError as e:
                raise FrameError(str(e), frame_id=frame_id) from None
        return BrokerMessage(subject, self._body(obj, frame_id), reply_to)

    def _body(self, obj: dict, frame_id) -> bytes:
        body = obj.get("body")
        b64 = obj.get("body_base64")
        if b64 is not None:
            if body is not None:
                raise FrameError("give either 'body' or 'body_base64', not both", frame_id=frame_id)
            if type(b64) is not str:
                raise FrameError("'body_base64' must be a string", frame_id=frame_id)
            try:
                return base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise FrameError("'body_base64' is not valid base64", frame_id=frame_id) from None
        if body is None:
            return b""
        t = type(body)
        if t is str:
            try:
                return body.encode("utf-8")
            except UnicodeEncodeError:
                raise FrameError("'body' holds a lone surrogate, which is not UTF-8 text; "
                                 "send bytes as 'body_base64'", frame_id=frame_id) from None
        if t is bytes:
            return body
        if t is list:
            try:
                return bytes(body)
            except (TypeError, ValueError):
                raise FrameError("'body' as an array must hold integers 0..255", frame_id=frame_id) from None
        raise FrameError("'body' must be a string (UTF-8 text) or an array of byte values; "
                         "use 'body_base64' for binary data", frame_id=frame_id)

    def decode_from_server(self, payload: bytes, is_binary: bool) -> Frame:
        """What a server sends, as a typed ``Frame``; ``FrameError`` for what cannot be used.

        Plain frames (not ours) are ``Message`` frames on ``message`` / ``binary.message``."""
        obj = self.loads(payload, is_binary)
        if obj is None:
            return Message(BrokerMessage(PLAIN_BINARY_SUBJECT if is_binary else PLAIN_TEXT_SUBJECT, payload))
        if type(obj) is not dict:
            raise FrameError(f"a frame must be an object, got {type(obj).__name__}")
        frame_id = obj.get("id")
        kind = obj.get("type", MESSAGE)
        if kind == MESSAGE or kind == REPLY:
            hops = obj.get("hops", 0)
            if type(hops) is not int or hops < 0:
                raise FrameError("'hops' must be a non-negative integer", frame_id=frame_id)
            return (Message if kind == MESSAGE else Reply)(self._message(obj, frame_id), frame_id, hops)
        if kind == WELCOME:
            return Welcome(_text_or_none(obj.get("session_id")), _text_or_none(obj.get("reply_to")),
                           _text_or_none(obj.get("protocol")), obj.get("max_message_size"))
        if kind == ERROR:
            return Error(str(obj.get("code", "error")), str(obj.get("message", "")), frame_id)
        if kind in _SUBJECT_FRAMES:
            return _SUBJECT_FRAMES[kind](_text_or_none(obj.get("subject")), frame_id)
        if kind == PONG:
            return Pong(frame_id)
        raise FrameError(f"unknown frame type {kind!r} from the server; expected one of: "
                         + ", ".join(sorted(SERVER_KINDS)), frame_id=frame_id)

    # -- outbound ---------------------------------------------------------------------

    def encode(self, frame: Frame):
        """``(payload, is_binary)`` for any ``Frame`` (either direction)."""
        kind = frame.kind
        if frame.message is not None:
            if frame.hops or frame.timeout_ms is not None:
                payload = self._message_with(frame.message, kind, frame.frame_id, frame.hops, frame.timeout_ms)
            else:
                payload = self.message(frame.message, kind, frame.frame_id)
        elif kind == ERROR:
            payload = self.error(frame.code, frame.text, frame.frame_id)
        elif kind == WELCOME:
            payload = self.control(WELCOME, session_id=frame.session_id, reply_to=frame.reply_to,
                                   protocol=frame.protocol, max_message_size=frame.max_message_size)
        elif frame.subject is not None:
            payload = self.control(kind, subject=frame.subject, id=frame.frame_id, queue=frame.queue)
        else:
            payload = self.control(kind, id=frame.frame_id)
        return payload, self.is_binary

    def message(self, msg: BrokerMessage, kind: str = MESSAGE, frame_id=None) -> bytes:
        """A message, reply or request frame: the server's hot path (``encode`` gives the same bytes)."""
        obj = {"type": kind, "subject": msg.subject}
        self.put_body(obj, msg.body)
        if msg.reply_to is not None:
            obj["reply_to"] = msg.reply_to
        if frame_id is not None:
            obj["id"] = frame_id
        return self.dumps(obj)

    def _message_with(self, msg: BrokerMessage, kind, frame_id, hops, timeout_ms) -> bytes:
        obj = {"type": kind, "subject": msg.subject}
        self.put_body(obj, msg.body)
        if msg.reply_to is not None:
            obj["reply_to"] = msg.reply_to
        if frame_id is not None:
            obj["id"] = frame_id
        if timeout_ms is not None:
            obj["timeout_ms"] = timeout_ms
        if hops:
            obj["hops"] = hops
        return self.dumps(obj)

    def error(self, code: str, message: str, frame_id=None) -> bytes:
        obj = {"type": "error", "code": code, "message": message}
        if frame_id is not None:
            obj["id"] = frame_id
        return self.dumps(obj)

    def control(self, kind: str, **fields) -> bytes:
        obj = {"type": kind}
        obj.update((k, v) for k, v in fields.items() if v is not None)
        return self.dumps(obj)


def _text_or_none(value):
    return value if type(value) is str and value else None


def _is_utf8_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Subjects already found valid (bounded; cleared when full).
_valid_subjects: dict = {}
_VALID_SUBJECTS_LIMIT = 10000

_scan_once = json.scanner.make_scanner(json.JSONDecoder())
_enc = json.encoder.encode_basestring  # the C version when available, as the encoder uses


# Bytes json.encoder.encode_basestring escapes (ensure_ascii=False): '"', '\\' and C0 controls.
_ESCAPED_BYTES = b'"\\' + bytes(range(32))
# Below this the per-character escape of encode_basestring costs less than the check.
_VERBATIM_MIN = 512
# From this size on (with the C loops), a frame's body string is found and cut out with a
# byte scan instead of being parsed character by character and encoded back to bytes.
_BODY_SCAN_MIN = 256
_BODY_KEY = b'"body":"'


def _verbatim_text(body) -> bool:
    """True if ``body`` is UTF-8 text whose JSON string literal is itself between quotes."""
    if ACCELERATED:
        # One pass settles plain ASCII (the common case); text with other characters
        # is scanned on from the first of them and checked as UTF-8.
        at = plain_ascii_prefix(body)
        if at == len(body):
            return True
        if plain_prefix(body, at) != len(body):
            return False
    elif len(body.translate(None, _ESCAPED_BYTES)) != len(body):
        return False
    return _is_utf8(body)


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _scan_document(payload: bytes):
    """The JSON value that is the whole of ``payload`` (UTF-8), by the C scanner straight
    on the text (what json.loads ends up calling, minus its encoding detection and
    wrappers); None for anything odd, which the caller hands to json.loads for its message."""
    try:
        text = payload.decode("utf-8")
        obj, end = _scan_once(text, 0)
    except (ValueError, StopIteration, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if end == len(text) or not text[end:].strip(" \t\n\r"):
        return obj
    return None


def _loads_around_body(payload: bytes):
    """Parse a JSON frame whose top-level ``"body"`` is a string without escapes, handing
    the body over as the frame's own bytes; None when that does not hold (the caller then
    parses the whole frame as usual, which also gives any error its message).

    Why this is exact: with no backslash anywhere in the frame, every '"' opens or closes a
    string, so a string ends at the first '"' after it opens. The body, from the quote after
    the one ``"body":"`` to the next '"' or escaped byte (``plain_prefix``), is cut out and
    the rest, with ``"body":""`` in its place, goes to the JSON parser. That the parser
    finds a top-level key "body" with the value "" while ``"body"`` occurs once in the rest
    proves the cut-out string was the top-level body.
    """
    i = payload.find(_BODY_KEY)
    if i < 0:
        return None
    start = i + 8
    end = plain_ascii_prefix(payload, start)
    ascii_body = end < len(payload) and payload[end] == 0x22
    if not ascii_body:
        end = plain_prefix(payload, end)
        if end >= len(payload) or payload[end] != 0x22:  # an escape or a control byte: parse it
            return None
    rest = payload[:start] + payload[end:]
    if b"\\" in rest or rest.count(b'"body"') != 1:
        return None
    obj = _scan_document(rest)
    if type(obj) is not dict or obj.get("body") != "":
        return None
    body = payload[start:end]
    if not ascii_body and not _is_utf8(body):
        return None  # the parser says why
    obj["body"] = body  # bytes: the codec takes them as they are
    return obj


class JsonCodec(_Codec):
    name = JSON_PROTOCOL
    is_binary = False

    _dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    def loads(self, payload: bytes, is_binary: bool):
        if is_binary:
            return None
        # Seed compatibility: text that is not a JSON object is a plain message.
        first = payload[:1]
        if first != b"{":
            stripped = payload.lstrip()
            if not stripped.startswith(b"{"):
                return None
        else:
            if ACCELERATED and len(payload) >= _BODY_SCAN_MIN:
                obj = _loads_around_body(payload)
                if obj is not None:
                    return obj
            # Fast path (the frame starts with "{": a result is an object, never None);
            # anything odd takes json.loads below, which produces the error message.
            obj = _scan_document(payload)
            if obj is not None:
                return obj
        try:
            return json.loads(payload)
        except ValueError as e:
            raise FrameError(f"frame is not valid JSON: {e}", code=BAD_JSON) from None
        except RecursionError:  # nesting deeper than the decoder can follow
            raise FrameError("frame is not usable JSON: nested too deeply", code=BAD_JSON) from None

    def message(self, msg: BrokerMessage, kind: str = MESSAGE, frame_id=None) -> bytes:
        # Same bytes as the generic encoder, without building a dict and walking it.
        body = msg.body
        if len(body) >= _VERBATIM_MIN and _verbatim_text(body):
            # The body's JSON literal is the body itself between quotes: no decode, no
            # escape scan, no encode (a 16 KiB body: 8 us instead of 22.5 us).
            parts = [b'{"type":', _enc(kind).encode(), b',"subject":', _enc(msg.subject).encode(),
                     b',"body":"', body, b'"']
            if msg.reply_to is not None:
                parts += (b',"reply_to":', _enc(msg.reply_to).encode())
            if frame_id is not None:
                parts += (b',"id":', (_enc(frame_id) if type(frame_id) is str else self._dumps(frame_id)).encode())
            parts.append(b"}")
            return b"".join(parts)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return _Codec.message(self, msg, kind, frame_id)
        parts = ['{"type":', _enc(kind), ',"subject":', _enc(msg.subject), ',"body":', _enc(text)]
        if msg.reply_to is not None:
            parts += (',"reply_to":', _enc(msg.reply_to))
        if frame_id is not None:
            parts += (',"id":', _enc(frame_id) if type(frame_id) is str else self._dumps(frame_id))
        parts.append("}")
        return "".join(parts).encode("utf-8")

    def dumps(self, obj) -> bytes:
        return self._dumps(obj).encode("utf-8")

    def put_body(self, obj: dict, body: bytes) -> None:
        try:
            obj["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            obj["body_base64"] = base64.b64encode(body).decode("ascii")


class MsgpackCodec(_Codec):
    name = MSGPACK_PROTOCOL
    is_binary = True

    def loads(self, payload: bytes, is_binary: bool):
        if not is_binary:
            raise FrameError("the msgpack protocol uses binary frames only", code=BAD_FRAME)
        try:
            return msgpack.unpackb(payload, raw=False)
        except Exception as e:  # msgpack raises several unrelated types
            raise FrameError(f"frame is not valid MessagePack: {e}", code=BAD_FRAME) from None

    def dumps(self, obj) -> bytes:
        return msgpack.packb(obj, use_bin_type=True)

    def put_body(self, obj: dict, body: bytes) -> None:
        obj["body"] = body


CODECS = {JSON_PROTOCOL: JsonCodec(), MSGPACK_PROTOCOL: MsgpackCodec()}
DEFAULT_CODEC = CODECS[JSON_PROTOCOL]


def codec_for(subprotocol: str | None) -> _Codec:
    return CODECS.get(subprotocol or JSON_PROTOCOL, DEFAULT_CODEC)
