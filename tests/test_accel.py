"""wsprovider._accel: the C loops (wsprovider/_speedups.c) and their pure-Python twins agree.

Both versions are checked in every run, whichever one the process uses. With
``WSPROVIDER_REQUIRE_SPEEDUPS=1`` (set by .ci/run for its first pass) the C version must
be the one in use, so a build that silently fell back to pure Python fails CI.
"""

import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from wsprovider import _accel


def reference_unmask(mask: bytes, data: bytes, offset: int = 0) -> bytes:
    return bytes(b ^ mask[(i + offset) % 4] for i, b in enumerate(data))


def reference_plain_prefix(data: bytes, start: int = 0) -> int:
    for i in range(max(0, start), len(data)):
        if data[i] < 0x20 or data[i] in b'"\\':
            return i
    return len(data)


def reference_plain_ascii_prefix(data: bytes, start: int = 0) -> int:
    i = reference_plain_prefix(data, start)
    for j in range(max(0, start), i):
        if data[j] >= 0x80:
            return j
    return i


def implementations():
    """(name, unmask, plain_prefix, unmask_ascii, plain_ascii_prefix) for each version here."""
    found = [("python", _accel._py_unmask, _accel._py_plain_prefix, _accel._py_unmask_ascii,
              _accel._py_plain_ascii_prefix)]
    try:
        from wsprovider import _speedups
    except ImportError:
        return found
    return found + [("c", _speedups.unmask, _speedups.plain_prefix, _speedups.unmask_ascii,
                     _speedups.plain_ascii_prefix)]


def frame_unmaskers():
    """(name, unmask_frame) for each version here."""
    found = [("python", _accel._py_unmask_frame)]
    try:
        from wsprovider import _speedups
    except ImportError:
        return found
    return found + [("c", _speedups.unmask_frame)]


class AccelTests(unittest.TestCase):
    def test_the_c_version_is_in_use_where_required(self):
        if os.environ.get("WSPROVIDER_REQUIRE_SPEEDUPS") == "1":
            self.assertTrue(_accel.ACCELERATED, "wsprovider._speedups did not build or import")
        if os.environ.get("WSPROVIDER_PURE_PYTHON"):
            self.assertFalse(_accel.ACCELERATED)

    def test_unmask_every_length_and_offset(self):
        for name, unmask, *_ in implementations():
            for n in (0, 1, 3, 4, 5, 7, 8, 9, 125, 126, 4095, 4096, 4097, 70000):
                for offset in range(5):
                    mask, data = os.urandom(4), os.urandom(n)
                    self.assertEqual(unmask(mask, data, offset), reference_unmask(mask, data, offset),
                                     (name, n, offset))

    def test_unmask_takes_any_bytes_like_object(self):
        for name, unmask, *_ in implementations():
            mask, data = b"\x01\x02\x03\x04", bytes(range(40))
            self.assertEqual(unmask(mask, memoryview(data)[3:], 3), reference_unmask(mask, data[3:], 3), name)
            self.assertEqual(unmask(mask, bytearray(data)), reference_unmask(mask, data), name)

    def test_unmask_refuses_a_bad_mask(self):
        if _accel.ACCELERATED:
            self.assertRaises(ValueError, _accel.unmask, b"\x00" * 3, b"data")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300), st.integers(-2, 310), st.sampled_from(b'"\\\x00\x1f\x20\x7f\x80\xff'),
           st.integers(0, 299))
    def test_plain_prefix_matches_the_reference(self, data, start, special, at):
        if data:
            data = data[:at % len(data)] + bytes([special]) + data[at % len(data) + 1:]
        for name, _, plain_prefix, *_ in implementations():
            self.assertEqual(plain_prefix(data, start), reference_plain_prefix(data, start), name)

    def test_plain_prefix_long_runs(self):
        # Blocks of 32 in the C loop: the escaped byte at every position of a block.
        for name, _, plain_prefix, *_ in implementations():
            for pos in range(0, 100):
                data = bytearray(b"a" * 100)
                data[pos] = 0x22
                self.assertEqual(plain_prefix(bytes(data)), pos, (name, pos))
                self.assertEqual(plain_prefix(bytes(data), pos + 1), 100, (name, pos))

    def test_plain_prefix_agrees_with_what_json_escapes(self):
        import json
        for byte in range(256):
            ch = bytes([byte])
            escaped = json.dumps(ch.decode("latin-1"), ensure_ascii=False)[1:-1] != ch.decode("latin-1")
            for name, _, plain_prefix, *_ in implementations():
                self.assertEqual(plain_prefix(ch) == 0, escaped, (name, byte))

    def test_unmask_ascii_says_whether_the_result_is_ascii(self):
        for name, _, _, unmask_ascii, _ in implementations():
            for n in (0, 1, 7, 8, 9, 63, 64, 65, 4097):
                for offset in range(4):
                    mask = os.urandom(4)
                    ascii_text = bytes(32 + (i * 7) % 95 for i in range(n))
                    masked = reference_unmask(mask, ascii_text, offset)
                    self.assertEqual(unmask_ascii(mask, masked, offset), (ascii_text, True), (name, n, offset))
                    for pos in range(0, n, max(1, n // 9)):  # one high byte anywhere, the tail too
                        text = ascii_text[:pos] + b"\xc3" + ascii_text[pos + 1:]
                        masked = reference_unmask(mask, text, offset)
                        self.assertEqual(unmask_ascii(mask, masked, offset), (text, False), (name, n, pos))

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300), st.integers(-2, 310), st.sampled_from(b'"\\\x00\x1f\x20\x7f\x80\xc3\xff'),
           st.integers(0, 299))
    def test_plain_ascii_prefix_matches_the_reference(self, data, start, special, at):
        if data:
            data = data[:at % len(data)] + bytes([special]) + data[at % len(data) + 1:]
        for name, *_, plain_ascii_prefix in implementations():
            self.assertEqual(plain_ascii_prefix(data, start), reference_plain_ascii_prefix(data, start), name)

    def test_plain_ascii_prefix_long_runs(self):
        for name, *_, plain_ascii_prefix in implementations():
            for pos in range(0, 200, 3):
                for special in (0x22, 0x80, 0xff):
                    data = bytearray(b"a" * 200)
                    data[pos] = special
                    self.assertEqual(plain_ascii_prefix(bytes(data)), pos, (name, pos, special))

    def test_unmask_frame_reads_the_mask_before_the_payload(self):
        mask = b"\x9a\x0b\xf3\x41"
        for name, unmask_frame in frame_unmaskers():
            for text in (b"", b"a", b"hello world" * 7, "h\u00e9llo".encode()):
                read = b"\x81\xfe" + mask + reference_unmask(mask, text) + b"\x81tail"
                end = 6 + len(text)
                self.assertEqual(unmask_frame(read, 6, end), (text, text.isascii()), (name, text))
                self.assertEqual(unmask_frame(memoryview(read), 6, end), (text, text.isascii()), name)

    def test_unmask_frame_refuses_bounds_outside_the_data(self):
        for name, unmask_frame in frame_unmaskers():
            for start, end in ((3, 5), (6, 5), (6, 11)):
                with self.assertRaises(ValueError, msg=(name, start, end)):
                    unmask_frame(b"\x00" * 10, start, end)
