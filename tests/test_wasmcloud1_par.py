"""The provider archive builder (wsprovider.wasmcloud1.par): contents, hashes, and claims
that verify with nkeys."""

import base64
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import types

import nkeys
from nacl.signing import VerifyKey
from twisted.trial import unittest

from wsprovider.wasmcloud1 import par

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def nkeys_verifier(public_key: str, prefix: int):
    """An nkeys KeyPair that verifies with ``public_key`` (nkeys 0.2 verifies through a key
    object's ``verify_key``; it has no public-key-only constructor)."""
    raw = base64.b32decode(public_key + "=" * (-len(public_key) % 8))
    body, checksum = raw[:-2], raw[-2:]
    assert bytes(nkeys.crc16_checksum(body)) == checksum, "bad nkey checksum"
    assert body[0] == prefix, "wrong nkey type"
    return nkeys.KeyPair(keys=types.SimpleNamespace(verify_key=VerifyKey(body[1:])))


class ArchiveTests(unittest.TestCase):
    def build(self):
        path = os.path.join(self.mktemp() + ".par.gz")
        summary = par.build(path, extra_path=REPO_ROOT)
        with tarfile.open(path, "r:gz") as tar:
            members = {m.name: (m, tar.extractfile(m).read()) for m in tar.getmembers()}
        return summary, members

    def test_contents_and_hashes(self):
        summary, members = self.build()
        target = par.local_target()
        self.assertEqual(sorted(members), sorted(["claims.jwt", f"{target}.bin"]))
        info, binary = members[f"{target}.bin"]
        self.assertEqual(info.mode & 0o777, 0o755)
        self.assertTrue(binary.startswith(b"#!" + os.path.abspath(sys.executable).encode() + b"\n"))
        claims = json.loads(b64url_decode(members["claims.jwt"][1].decode().split(".")[1]))
        self.assertEqual(claims["wascap"]["target_hashes"], {target: hashlib.sha256(binary).hexdigest().upper()})
        self.assertEqual((claims["iss"], claims["sub"]), (summary["issuer"], summary["subject"]))
        self.assertTrue(claims["iss"].startswith("A") and claims["sub"].startswith("V"))

    def test_claims_verify_with_nkeys(self):
        summary, members = self.build()
        header, payload, signature = members["claims.jwt"][1].decode().split(".")
        self.assertEqual(json.loads(b64url_decode(header)), {"typ": "jwt", "alg": "Ed25519"})
        verifier = nkeys_verifier(summary["issuer"], nkeys.PREFIX_BYTE_ACCOUNT)
        self.assertTrue(verifier.verify(f"{header}.{payload}".encode(), b64url_decode(signature)))
        self.assertRaises(nkeys.ErrInvalidSignature, verifier.verify, f"{header}.{payload}x".encode(),
                          b64url_decode(signature))

    def test_launcher_runs_with_an_empty_environment(self):
        """The host clears the environment (no PATH, no HOME): the launcher still starts, and
        without HostData on stdin it says what it expected."""
        launcher = par.write_launcher(self.mktemp(), extra_path=REPO_ROOT)
        done = subprocess.run([launcher], env={}, input=b"", capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 2, done.stderr)
        self.assertIn(b"no HostData line", done.stderr)

    def test_command_line(self):
        out = os.path.abspath(self.mktemp()) + ".par.gz"
        done = subprocess.run([sys.executable, "-m", "wsprovider.wasmcloud1.par", "-o", out],
                              capture_output=True, timeout=60, cwd=REPO_ROOT)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(b"wrote ", done.stdout)
        self.assertTrue(tarfile.is_tarfile(out))
