"""xkeys (wsprovider.wasmcloud1.xkeys): nkeys-encoded curve keys and xkv1 sealed values."""

import nkeys
from nacl.public import Box, PrivateKey, PublicKey
from twisted.trial import unittest

from wsprovider.wasmcloud1 import xkeys

CAPTURED_PROVIDER_XKEY = "XB4JMLMFNN7SGPIGDMARX5W6KXM4CRWUUVXOOI3CF4W3YFXRH63UU3NU"  # provider-lifecycle capture


class KeyEncodingTests(unittest.TestCase):
    def test_captured_public_key_decodes(self):
        raw = xkeys.decode_public(CAPTURED_PROVIDER_XKEY)
        self.assertEqual(len(raw), 32)
        self.assertEqual(xkeys.encode_public(raw), CAPTURED_PROVIDER_XKEY)

    def test_seed_and_public_prefixes(self):
        seed = xkeys.new_seed()
        self.assertTrue(seed.startswith("SX"))
        public = xkeys.public_from_seed(seed)
        self.assertTrue(public.startswith("X"))
        self.assertEqual(xkeys.decode_public(public), bytes(PrivateKey(xkeys.decode_seed(seed)).public_key))

    def test_bad_checksum_and_wrong_kind(self):
        broken = CAPTURED_PROVIDER_XKEY[:-1] + ("A" if CAPTURED_PROVIDER_XKEY[-1] != "A" else "B")
        self.assertRaises(xkeys.XKeyError, xkeys.decode_public, broken)
        self.assertRaises(xkeys.XKeyError, xkeys.decode_seed, CAPTURED_PROVIDER_XKEY)
        self.assertRaises(xkeys.XKeyError, xkeys.decode_public, "not base32 !")
        user = nkeys.from_seed(nkeys.encode_seed(b"u" * 32, nkeys.PREFIX_BYTE_USER)).public_key.decode()
        error = self.assertRaises(xkeys.XKeyError, xkeys.decode_public, user)  # valid, but not a curve key
        self.assertIn("not a curve public key", str(error))


class SealedValueTests(unittest.TestCase):
    def setUp(self):
        self.host_seed, self.provider_seed = xkeys.new_seed(), xkeys.new_seed()

    def test_round_trip_and_format(self):
        sealed = xkeys.seal(b'{"AUTH_TOKEN":1}', self.host_seed, xkeys.public_from_seed(self.provider_seed))
        self.assertTrue(sealed.startswith(b"xkv1"))
        self.assertEqual(len(sealed), 4 + 24 + 16 + 16)
        self.assertEqual(xkeys.open_sealed(sealed, self.provider_seed, xkeys.public_from_seed(self.host_seed)),
                         b'{"AUTH_TOKEN":1}')

    def test_opens_what_pynacl_box_sealed_directly(self):
        """The format is the NaCl box with the nonce in front, nothing of ours."""
        box = Box(PrivateKey(xkeys.decode_seed(self.host_seed)),
                  PublicKey(xkeys.decode_public(xkeys.public_from_seed(self.provider_seed))))
        nonce = b"n" * 24
        sealed = b"xkv1" + nonce + box.encrypt(b"secret", nonce).ciphertext
        self.assertEqual(xkeys.open_sealed(sealed, self.provider_seed, xkeys.public_from_seed(self.host_seed)),
                         b"secret")

    def test_wrong_key_and_garbage_are_clear_errors(self):
        sealed = xkeys.seal(b"x", self.host_seed, xkeys.public_from_seed(self.provider_seed))
        error = self.assertRaises(xkeys.XKeyError, xkeys.open_sealed, sealed, xkeys.new_seed(),
                                  xkeys.public_from_seed(self.host_seed))
        self.assertIn("does not open", str(error))
        self.assertRaises(xkeys.XKeyError, xkeys.open_sealed, b"xkv2" + sealed[4:], self.provider_seed,
                          xkeys.public_from_seed(self.host_seed))
