"""The component-model value encoding wRPC puts on the wire, for the types messaging needs.

Each WIT type is a small object with ``encode(value) -> bytes`` and ``decode(reader)``;
compose them (``Option(String)``, ``Result(None, String)``, ``Record(...)``, ``Tuple(...)``)
to describe a function's parameters or results. The encoding (as in wasm-tokio and
wrpc-transport):

=================  ============================================================
``u8`` / ``bool``  one byte (bool: 0 or 1)
``u32`` / ``u64``  unsigned LEB128 (at most 5 bytes for u32, 10 for u64)
``string``         LEB128 byte length, then UTF-8 (invalid UTF-8 is an error)
``list<u8>``       LEB128 length, then the bytes
``option<T>``      ``00`` none, ``01`` + T some
``result<O, E>``   ``00`` + O ok, ``01`` + E err; a unit side encodes to nothing
record / tuple     members concatenated in declaration order
=================  ============================================================

Values arrive split over several NATS messages, so decoding is incremental:
``decode_prefix(type, data)`` raises ``Incomplete`` while ``data`` holds only part of a
value, and returns ``(value, bytes used)`` once it holds all of it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attr


class DecodeError(ValueError):
    """The bytes are not a valid encoding of the expected type."""


class Incomplete(DecodeError):
    """The bytes end inside a value: more are needed."""


@attr.s(frozen=True, slots=True, repr=True)
class Ok:
    """The ok side of a ``result``; ``value`` is None for a unit ``_``."""

    value: Any = attr.ib(default=None)


@attr.s(frozen=True, slots=True, repr=True)
class Err:
    """The err side of a ``result``."""

    value: Any = attr.ib(default=None)


class Reader:
    """A cursor over bytes; every read raises ``Incomplete`` if the bytes run out."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes, pos: int = 0):
        self.data = data
        self.pos = pos

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise Incomplete(f"need {end - len(self.data)} more bytes")
        chunk = self.data[self.pos:end]
        self.pos = end
        return bytes(chunk)

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise Incomplete("need 1 more byte")
        value = self.data[self.pos]
        self.pos += 1
        return value


# -- primitive types -------------------------------------------------------------------

class _Leb128:
    def __init__(self, name: str, bits: int):
        self.name = name
        self.bits = bits
        self.max_bytes = (bits + 6) // 7

    def encode(self, value: int) -> bytes:
        if type(value) is not int or value < 0 or value >> self.bits:
            raise ValueError(f"{self.name}: {value!r} is not an integer in 0..{(1 << self.bits) - 1}")
        out = bytearray()
        while True:
            low = value & 0x7F
            value >>= 7
            if value:
                out.append(low | 0x80)
            else:
                out.append(low)
                return bytes(out)

    def decode(self, reader: Reader) -> int:
        value = shift = 0
        for index in range(self.max_bytes):
            b = reader.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                if value >> self.bits:
                    raise DecodeError(f"{self.name}: LEB128 value {value} overflows {self.bits} bits")
                return value
            shift += 7
        raise DecodeError(f"{self.name}: LEB128 longer than {self.max_bytes} bytes")

    def __repr__(self):
        return self.name


U32 = _Leb128("u32", 32)
U64 = _Leb128("u64", 64)
U16 = _Leb128("u16", 16)


class _U8:
    def encode(self, value: int) -> bytes:
        if type(value) is not int or not 0 <= value <= 255:
            raise ValueError(f"u8: {value!r} is not an integer in 0..255")
        return bytes((value,))

    def decode(self, reader: Reader) -> int:
        return reader.byte()

    def __repr__(self):
        return "u8"


class _Bool:
    def encode(self, value: bool) -> bytes:
        if type(value) is not bool:
            raise ValueError(f"bool: {value!r} is not a bool")
        return b"\x01" if value else b"\x00"

    def decode(self, reader: Reader) -> bool:
        b = reader.byte()
        if b > 1:
            raise DecodeError(f"bool: byte {b:#04x} is neither 00 nor 01")
        return b == 1

    def __repr__(self):
        return "bool"


class _String:
    def encode(self, value: str) -> bytes:
        if type(value) is not str:
            raise ValueError(f"string: {value!r} is not a str")
        data = value.encode("utf-8")
        return U32.encode(len(data)) + data

    def decode(self, reader: Reader) -> str:
        data = reader.take(U32.decode(reader))
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DecodeError(f"string: not valid UTF-8 ({error})") from None

    def __repr__(self):
        return "string"


class _Bytes:
    """``list<u8>``: bytes in, bytes out."""

    def encode(self, value: bytes) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"list<u8>: {type(value).__name__} is not bytes")
        return U32.encode(len(value)) + bytes(value)

    def decode(self, reader: Reader) -> bytes:
        return reader.take(U32.decode(reader))

    def __repr__(self):
        return "list<u8>"


U8 = _U8()
Bool = _Bool()
String = _String()
Bytes = _Bytes()


# -- composite types -------------------------------------------------------------------

class Option:
    """``option<T>``: None is none; anything else is some."""

    def __init__(self, inner):
        self.inner = inner

    def encode(self, value) -> bytes:
        return b"\x00" if value is None else b"\x01" + self.inner.encode(value)

    def decode(self, reader: Reader):
        tag = reader.byte()
        if tag == 0:
            return None
        if tag == 1:
            return self.inner.decode(reader)
        raise DecodeError(f"option: tag byte {tag:#04x} is neither 00 (none) nor 01 (some)")

    def __repr__(self):
        return f"option<{self.inner!r}>"


class Result:
    """``result<O, E>``; ``None`` for a unit side (``_``). Values are ``Ok`` / ``Err``."""

    def __init__(self, ok=None, err=None):
        self.ok = ok
        self.err = err

    def encode(self, value) -> bytes:
        if isinstance(value, Ok):
            return b"\x00" + (self.ok.encode(value.value) if self.ok is not None else b"")
        if isinstance(value, Err):
            return b"\x01" + (self.err.encode(value.value) if self.err is not None else b"")
        raise ValueError(f"{self!r}: {value!r} is neither Ok(...) nor Err(...)")

    def decode(self, reader: Reader):
        tag = reader.byte()
        if tag == 0:
            return Ok(self.ok.decode(reader) if self.ok is not None else None)
        if tag == 1:
            return Err(self.err.decode(reader) if self.err is not None else None)
        raise DecodeError(f"result: tag byte {tag:#04x} is neither 00 (ok) nor 01 (err)")

    def __repr__(self):
        return f"result<{self.ok!r}, {self.err!r}>"


class Tuple:
    """A tuple, a parameter list or a result list: members concatenated."""

    def __init__(self, *members):
        self.members = members

    def encode(self, values: Sequence) -> bytes:
        if len(values) != len(self.members):
            raise ValueError(f"{self!r}: expected {len(self.members)} values, got {len(values)}")
        return b"".join(t.encode(v) for t, v in zip(self.members, values))

    def decode(self, reader: Reader) -> tuple:
        return tuple(t.decode(reader) for t in self.members)

    def __repr__(self):
        return f"tuple<{', '.join(map(repr, self.members))}>"


class Record:
    """A record: fields in declaration order, no tags; ``make`` builds the Python value
    from the decoded fields (keyword arguments), ``fields_of`` takes them apart."""

    def __init__(self, name: str, fields: Sequence[tuple[str, Any]],
                 make: Callable[..., Any] = dict, fields_of: Callable[[Any], dict] | None = None):
        self.name = name
        self.fields = tuple(fields)
        self.make = make
        self.fields_of = fields_of or (lambda value: value)

    def encode(self, value) -> bytes:
        values = self.fields_of(value)
        return b"".join(t.encode(values[name]) for name, t in self.fields)

    def decode(self, reader: Reader):
        values = {name: t.decode(reader) for name, t in self.fields}
        try:
            return self.make(**values)
        except (TypeError, ValueError) as error:
            raise DecodeError(f"{self.name}: {error}") from None

    def __repr__(self):
        return f"record {self.name}"


def encode(wit_type, value) -> bytes:
    return wit_type.encode(value)


def decode_prefix(wit_type, data: bytes):
    """Decode one value from the start of ``data``: ``(value, bytes used)``, or ``Incomplete``."""
    reader = Reader(data)
    value = wit_type.decode(reader)
    return value, reader.pos


def decode(wit_type, data: bytes):
    """Decode exactly one value; trailing bytes are an error."""
    value, used = decode_prefix(wit_type, data)
    if used != len(data):
        raise DecodeError(f"{wit_type!r}: {len(data) - used} bytes left over after the value")
    return value


class IncrementalDecoder:
    """Feed chunks as they arrive; ``feed`` returns True once a whole value is in.

    Re-parses from the start on each chunk (values here are a few fields: the cost is the
    bytes, which are kept anyway), and never holds more than ``limit`` bytes.
    """

    def __init__(self, wit_type, limit: int | None = None):
        self.wit_type = wit_type
        self.limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.value = None
        self.used = 0
        self.done = False

    def feed(self, chunk: bytes) -> bool:
        if self.done:
            return True
        self._chunks.append(bytes(chunk))
        self._size += len(chunk)
        if self.limit is not None and self._size > self.limit:
            raise DecodeError(f"{self.wit_type!r}: value larger than the limit of {self.limit} bytes")
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks = [data]
        try:
            self.value, self.used = decode_prefix(self.wit_type, data)
        except Incomplete:
            return False
        self.done = True
        self._chunks = []
        return True

    @property
    def buffered(self) -> int:
        return self._size
