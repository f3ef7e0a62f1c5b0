"""Byte loops of the frame and envelope paths, in C when built, else in pure Python.

``wsprovider._speedups`` (``wsprovider/_speedups.c``) is an optional extension: ``pip
install .`` builds it where a C compiler is present. Without it, or with
``WSPROVIDER_PURE_PYTHON=1`` in the environment, the pure-Python versions below give the
same results; the test suite runs against both (``.ci/run``). ``ACCELERATED`` says which
is in use, and paths that only pay off with C (the envelope's body scan) check it.
"""

from __future__ import annotations

import os
import re

from autobahn.websocket.xormasker import create_xor_masker

_from_bytes = int.from_bytes
_BIG_UNMASK = 4096
_ESCAPED = re.compile(rb'["\\\x00-\x1f]')
_ESCAPED_OR_HIGH = re.compile(rb'["\\\x00-\x1f\x80-\xff]')


def _py_unmask(mask: bytes, payload, offset: int = 0) -> bytes:
    """``payload`` XOR the repeated 4-byte ``mask`` (RFC 6455 5.3), from byte ``offset`` of its cycle."""
    k = offset & 3
    if k:
        mask = mask[k:] + mask[:k]
    n = len(payload)
    if n > _BIG_UNMASK:
        return create_xor_masker(mask, n).process(bytes(payload))
    if not n:
        return b""
    key = (mask * ((n >> 2) + 1))[:n]
    return (_from_bytes(payload, "little") ^ _from_bytes(key, "little")).to_bytes(n, "little")


def _py_unmask_ascii(mask: bytes, payload, offset: int = 0):
    """``(unmask(mask, payload, offset), whether that is all ASCII)``."""
    plain = _py_unmask(mask, payload, offset)
    return plain, plain.isascii()


def _py_unmask_frame(data, start: int, end: int):
    """``unmask_ascii`` of ``data[start:end]``, the mask being the 4 bytes before ``start``."""
    if not 4 <= start <= end <= len(data):
        raise ValueError("unmask_frame: need 4 <= start <= end <= len(data)")
    return _py_unmask_ascii(bytes(data[start - 4:start]), memoryview(data)[start:end])


def _py_plain_prefix(data, start: int = 0) -> int:
    """Index of the first byte at or after ``start`` that a JSON string cannot hold as is
    ('"', '\\\\', a C0 control), or ``len(data)``."""
    m = _ESCAPED.search(data, max(0, start))
    return m.start() if m is not None else len(data)


def _py_plain_ascii_prefix(data, start: int = 0) -> int:
    """``plain_prefix``, stopping also at the first byte >= 0x80."""
    m = _ESCAPED_OR_HIGH.search(data, max(0, start))
    return m.start() if m is not None else len(data)


_speedups = None
if not os.environ.get("WSPROVIDER_PURE_PYTHON"):
    try:
        from . import _speedups
    except ImportError:  # not built (no compiler at install time): the pure versions
        _speedups = None

ACCELERATED = _speedups is not None
if ACCELERATED:
    unmask = _speedups.unmask
    unmask_ascii = _speedups.unmask_ascii
    unmask_frame = _speedups.unmask_frame
    plain_prefix = _speedups.plain_prefix
    plain_ascii_prefix = _speedups.plain_ascii_prefix
else:
    unmask = _py_unmask
    unmask_ascii = _py_unmask_ascii
    unmask_frame = _py_unmask_frame
    plain_prefix = _py_plain_prefix
    plain_ascii_prefix = _py_plain_ascii_prefix

__all__ = ["ACCELERATED", "unmask", "unmask_ascii", "unmask_frame", "plain_prefix", "plain_ascii_prefix"]
