"""Curve ("xkey") keys in the nkeys text encoding, and the xkv1 sealed secrets of wasmCloud.

The ``nkeys`` package (0.2) does ed25519 keys only, so the curve prefix is handled here;
the checksum is ``nkeys.crc16_checksum`` and the cryptography is PyNaCl's ``Box``
(Curve25519 + XSalsa20-Poly1305), the primitive the host seals with. Nothing is
hand-written but the framing:

* public key ``X...``: ``base32_nopad(23<<3 || 32 bytes || crc16)``;
* seed ``SX...``: ``base32_nopad((18<<3)|(23<<3 >> 5) || ((23<<3) & 31) << 3 || 32 bytes || crc16)``;
* sealed value: ``b"xkv1" || 24-byte nonce || box ciphertext``.
"""

from __future__ import annotations

import base64
import binascii

import nkeys
from nacl.exceptions import CryptoError
from nacl.public import Box, PrivateKey, PublicKey
from nacl.utils import random as random_bytes

PREFIX_BYTE_CURVE = 23 << 3
PREFIX_BYTE_SEED = 18 << 3
SEALED_VERSION = b"xkv1"


class XKeyError(ValueError):
    """An xkey string or a sealed value is malformed, or does not open with our key."""


def _b32decode(text: str) -> bytes:
    try:
        return base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise XKeyError("not valid base32") from None


def _checked(raw: bytes) -> bytes:
    body, checksum = raw[:-2], raw[-2:]
    if bytes(nkeys.crc16_checksum(body)) != checksum:
        raise XKeyError("bad checksum")
    return body


def _encode(body: bytes) -> str:
    return base64.b32encode(body + bytes(nkeys.crc16_checksum(body))).rstrip(b"=").decode()


def encode_public(raw: bytes) -> str:
    if len(raw) != 32:
        raise XKeyError("a curve public key is 32 bytes")
    return _encode(bytes((PREFIX_BYTE_CURVE,)) + raw)


def encode_seed(raw: bytes) -> str:
    if len(raw) != 32:
        raise XKeyError("a curve seed is 32 bytes")
    return _encode(bytes((PREFIX_BYTE_SEED | PREFIX_BYTE_CURVE >> 5, (PREFIX_BYTE_CURVE & 31) << 3)) + raw)


def decode_public(text: str) -> bytes:
    """The 32 raw bytes of an ``X...`` public key."""
    body = _checked(_b32decode(text.strip()))
    if len(body) != 33 or body[0] != PREFIX_BYTE_CURVE:
        raise XKeyError(f"{text[:2]!r}...: not a curve public key (expected X...)")
    return body[1:]


def decode_seed(text: str) -> bytes:
    """The 32 raw bytes of an ``SX...`` curve seed."""
    body = _checked(_b32decode(text.strip()))
    if (len(body) != 34 or body[0] & 0xF8 != PREFIX_BYTE_SEED
            or ((body[0] & 7) << 5 | (body[1] & 0xF8) >> 3) != PREFIX_BYTE_CURVE):
        raise XKeyError("not a curve seed (expected SX...)")
    return body[2:]


def public_from_seed(seed: str) -> str:
    """``X...`` for an ``SX...`` seed."""
    return encode_public(bytes(PrivateKey(decode_seed(seed)).public_key))


def new_seed() -> str:
    return encode_seed(bytes(PrivateKey.generate()))


def open_sealed(sealed: bytes, recipient_seed: str, sender_public: str) -> bytes:
    """Open an xkv1 value sealed for ``recipient_seed`` by ``sender_public``."""
    sealed = bytes(sealed)
    if not sealed.startswith(SEALED_VERSION) or len(sealed) < len(SEALED_VERSION) + 24 + 16:
        raise XKeyError("not an xkv1 sealed value")
    nonce = sealed[4:28]
    box = Box(PrivateKey(decode_seed(recipient_seed)), PublicKey(decode_public(sender_public)))
    try:
        return box.decrypt(sealed[28:], nonce)
    except CryptoError:
        raise XKeyError("the sealed value does not open with this provider's xkey "
                        "(sealed for another key, or corrupted)") from None


def seal(plaintext: bytes, sender_seed: str, recipient_public: str) -> bytes:
    """Seal as the host does (used by tests and tools)."""
    box = Box(PrivateKey(decode_seed(sender_seed)), PublicKey(decode_public(recipient_public)))
    nonce = random_bytes(24)
    return SEALED_VERSION + nonce + box.encrypt(plaintext, nonce).ciphertext
