"""Build a provider archive (``.par.gz``) of this installation for the local target.

    python -m wsprovider.wasmcloud1.par -o wsprovider.par.gz

A PAR is a (gzipped) tar holding ``claims.jwt`` and one ``{arch}-{os}.bin`` executable per
target. The host picks the binary for its own target (``x86_64-linux``, ``aarch64-linux``,
``aarch64-macos``, ...), writes it out with mode 0755 and runs it with an empty environment,
so ours is a launcher script whose first line names this Python by absolute path.

``claims.jwt`` is a wascap capability-provider token: header ``{"typ":"jwt","alg":"Ed25519"}``,
claims with ``iss`` (an account key, ``A...``), ``sub`` (a service key, ``V...``) and
``wascap.target_hashes`` (upper-case hex SHA-256 of each binary), signed with the account's
ed25519 key through ``nkeys``. Keys are new for each build unless seeds are given.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import platform
import secrets
import sys
import tarfile
import time

import nkeys

from .._version import __version__

PREFIX_BYTE_SERVICE = 21 << 3  # "V": wascap's provider subject keys (nkeys 0.2 has no constant for it)
CAPABILITY = "wasmcloud:messaging"


def local_target() -> str:
    """``{arch}-{os}`` as the Rust host spells its own target."""
    arch = {"amd64": "x86_64", "arm64": "aarch64", "x64": "x86_64"}.get(platform.machine().lower(),
                                                                          platform.machine().lower())
    system = {"darwin": "macos"}.get(sys.platform, "windows" if sys.platform.startswith("win") else "linux"
                                     if sys.platform.startswith("linux") else sys.platform)
    return f"{arch}-{system}"


def launcher(python: str | None = None, extra_path: str | None = None) -> bytes:
    """The executable the host runs: this interpreter by absolute path, then our entry point."""
    python = os.path.abspath(python or sys.executable)
    lines = [f"#!{python}", "# wsprovider-wasmcloud launcher (built by python -m wsprovider.wasmcloud1.par)",
             "import sys"]
    if extra_path:
        lines.append(f"sys.path.insert(0, {os.path.abspath(extra_path)!r})")
    lines += ["from wsprovider.wasmcloud1.main import main", "sys.exit(main())", ""]
    return "\n".join(lines).encode()


def write_launcher(path: str, python: str | None = None, extra_path: str | None = None) -> str:
    with open(path, "wb") as f:
        f.write(launcher(python, extra_path))
    os.chmod(path, 0o755)
    return path


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public_key(prefix: int, raw: bytes) -> str:
    body = bytes((prefix,)) + raw
    return base64.b32encode(body + bytes(nkeys.crc16_checksum(body))).rstrip(b"=").decode()


def new_account_seed() -> bytes:
    return nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_ACCOUNT)


def service_public_key(raw_seed: bytes | None = None) -> str:
    """A ``V...`` key (wascap's provider subject) for a 32-byte ed25519 seed (random if None)."""
    from nacl.signing import SigningKey
    key = SigningKey(raw_seed or secrets.token_bytes(32))
    return _public_key(PREFIX_BYTE_SERVICE, bytes(key.verify_key))


def hash_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest().upper()


def claims_jwt(binaries: dict, issuer_seed: bytes, subject: str, name="wsprovider", vendor="wsprovider",
               now: int | None = None) -> str:
    issuer = nkeys.from_seed(bytearray(issuer_seed))
    try:
        claims = {
            "jti": secrets.token_hex(11), "iat": int(time.time() if now is None else now),
            "iss": issuer.public_key.decode(), "sub": subject,
            "wascap": {"name": name, "capid": CAPABILITY, "vendor": vendor, "rev": 0, "ver": __version__,
                       "target_hashes": {target: hash_hex(data) for target, data in sorted(binaries.items())}},
            "wascap_revision": 3,
        }
        signing_input = (_b64url(json.dumps({"typ": "jwt", "alg": "Ed25519"}, separators=(",", ":")).encode())
                         + "." + _b64url(json.dumps(claims, separators=(",", ":")).encode()))
        signature = issuer.sign(signing_input.encode())
    finally:
        issuer.wipe()
    return signing_input + "." + _b64url(signature)


def build(output: str, issuer_seed: bytes | None = None, python: str | None = None,
          extra_path: str | None = None, target: str | None = None) -> dict:
    """Write the archive; return a summary (path, target, issuer, subject)."""
    target = target or local_target()
    binaries = {target: launcher(python, extra_path)}
    issuer_seed = issuer_seed or new_account_seed()
    subject = service_public_key()
    jwt = claims_jwt(binaries, issuer_seed, subject)
    with tarfile.open(output, "w:gz") as tar:
        _add(tar, "claims.jwt", jwt.encode(), 0o644)
        for name, data in binaries.items():
            _add(tar, f"{name}.bin", data, 0o755)
    issuer = nkeys.from_seed(bytearray(issuer_seed))
    try:
        issuer_public = issuer.public_key.decode()
    finally:
        issuer.wipe()
    return {"path": os.path.abspath(output), "target": target, "issuer": issuer_public, "subject": subject}


def _add(tar, name, data, mode):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsprovider.wasmcloud1.par",
                                     description="Build a wasmCloud 1.x provider archive of this installation.")
    parser.add_argument("-o", "--output", default="wsprovider.par.gz", help="archive to write [wsprovider.par.gz]")
    parser.add_argument("--issuer-seed-file", help="file holding the account seed (SA...) that signs the claims; "
                                                   "default: a new one for this build")
    parser.add_argument("--python", help="interpreter the launcher runs [this one: %(default)s]",
                        default=sys.executable)
    parser.add_argument("--path", help="directory to put first on sys.path (a source checkout); default: none, "
                                       "the interpreter's installed wsprovider is used")
    args = parser.parse_args(argv)
    seed = None
    if args.issuer_seed_file:
        with open(args.issuer_seed_file, "rb") as f:
            seed = f.read().strip()
    summary = build(args.output, seed, args.python, args.path)
    print(f"wrote {summary['path']} for {summary['target']} (issuer {summary['issuer']}, "
          f"subject {summary['subject']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
