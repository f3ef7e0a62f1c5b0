"""The component-model value codec (wsprovider.wasmcloud1.values), without I/O."""

from hypothesis import given, strategies as st
from twisted.trial import unittest

from wsprovider.wasmcloud1 import values as v


class Leb128Tests(unittest.TestCase):
    def test_spec_examples(self):
        for number, encoded in [(0, "00"), (127, "7f"), (128, "8001"), (1000, "e807"), (5000, "8827"),
                                (2 ** 32 - 1, "ffffffff0f")]:
            self.assertEqual(v.U32.encode(number).hex(), encoded)
            self.assertEqual(v.decode(v.U32, bytes.fromhex(encoded)), number)

    def test_out_of_range_is_refused(self):
        self.assertRaises(ValueError, v.U32.encode, 2 ** 32)
        self.assertRaises(ValueError, v.U32.encode, -1)
        self.assertRaises(ValueError, v.U32.encode, True)

    def test_overflow_and_overlong_are_errors(self):
        self.assertRaises(v.DecodeError, v.decode, v.U32, bytes.fromhex("ffffffff1f"))
        self.assertRaises(v.DecodeError, v.decode, v.U32, bytes.fromhex("8080808080"))

    def test_truncated_is_incomplete(self):
        self.assertRaises(v.Incomplete, v.decode, v.U32, bytes.fromhex("80"))

    @given(st.integers(0, 2 ** 32 - 1))
    def test_round_trip(self, number):
        self.assertEqual(v.decode(v.U32, v.U32.encode(number)), number)


class StringAndBytesTests(unittest.TestCase):
    def test_string_is_length_then_utf8(self):
        self.assertEqual(v.String.encode("a.b").hex(), "03612e62")
        self.assertEqual(v.String.encode("").hex(), "00")
        self.assertEqual(v.String.encode("é").hex(), "02c3a9")

    def test_invalid_utf8_is_an_error(self):
        error = self.assertRaises(v.DecodeError, v.decode, v.String, b"\x01\xff")
        self.assertIn("UTF-8", str(error))

    def test_bytes(self):
        self.assertEqual(v.Bytes.encode(b"hi").hex(), "026869")
        self.assertEqual(v.decode(v.Bytes, bytes.fromhex("026869")), b"hi")

    def test_trailing_bytes_are_an_error(self):
        self.assertRaises(v.DecodeError, v.decode, v.Bytes, bytes.fromhex("02686900"))

    @given(st.text())
    def test_string_round_trip(self, text):
        self.assertEqual(v.decode(v.String, v.String.encode(text)), text)


class OptionResultTests(unittest.TestCase):
    def test_option(self):
        t = v.Option(v.String)
        self.assertEqual(t.encode(None), b"\x00")
        self.assertEqual(t.encode("r.1").hex(), "0103722e31")
        self.assertEqual(v.decode(t, bytes.fromhex("0103722e31")), "r.1")
        self.assertRaises(v.DecodeError, v.decode, t, b"\x02")

    def test_result_unit_ok_and_string_err(self):
        t = v.Result(None, v.String)
        self.assertEqual(t.encode(v.Ok()), b"\x00")
        self.assertEqual(t.encode(v.Err("boom")).hex(), "0104626f6f6d")
        self.assertEqual(v.decode(t, b"\x00"), v.Ok(None))
        self.assertEqual(v.decode(t, bytes.fromhex("0104626f6f6d")), v.Err("boom"))
        self.assertRaises(v.DecodeError, v.decode, t, b"\x07")
        self.assertRaises(ValueError, t.encode, "boom")

    def test_bool_and_u8(self):
        self.assertEqual(v.Bool.encode(True), b"\x01")
        self.assertRaises(v.DecodeError, v.decode, v.Bool, b"\x02")
        self.assertEqual(v.decode(v.U8, b"\xff"), 255)


class IncrementalDecoderTests(unittest.TestCase):
    def test_value_split_anywhere(self):
        t = v.Tuple(v.String, v.Bytes, v.U32)
        data = t.encode(("svc.echo", b"x" * 300, 1000))
        for cut in range(len(data)):
            decoder = v.IncrementalDecoder(t)
            self.assertFalse(decoder.feed(data[:cut]) and cut < len(data))
            self.assertTrue(decoder.feed(data[cut:]))
            self.assertEqual(decoder.value, ("svc.echo", b"x" * 300, 1000))
            self.assertEqual(decoder.used, len(data))

    def test_limit(self):
        decoder = v.IncrementalDecoder(v.Bytes, limit=10)
        self.assertRaises(v.DecodeError, decoder.feed, b"\x20" + b"x" * 20)
