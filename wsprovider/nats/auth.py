"""Credentials for CONNECT: token, user/password, nkey seed, or user JWT + seed (.creds)."""

import base64

import attrs
import nkeys


def load_creds(text: str) -> tuple[str, bytes]:
    """Return (user JWT, nkey seed) from the text of a ``.creds`` file."""
    jwt = seed = None
    lines = [line.strip() for line in text.splitlines()]
    for index, line in enumerate(lines):
        if line.startswith("---") and "BEGIN" in line:
            value = next((candidate for candidate in lines[index + 1:] if candidate), "")
            if "JWT" in line:
                jwt = value
            elif "SEED" in line:
                seed = value.encode()
    if not jwt or not seed:
        raise ValueError("creds file must contain a user JWT block and a user nkey seed block")
    return jwt, seed


def sign_nonce(seed: bytes, nonce: str) -> tuple[str, str]:
    """Sign the server's nonce with an nkey seed; return (public key, signature), both text."""
    keypair = nkeys.from_seed(bytearray(seed))
    try:
        signature = keypair.sign(nonce.encode())
        public_key = keypair.public_key.decode()
    finally:
        keypair.wipe()
    return public_key, base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


@attrs.frozen(repr=False)
class Credentials:
    """What we authenticate with; secrets are left out of ``repr``."""

    token: str | None = None
    user: str | None = None
    password: str | None = None
    nkey_seed: bytes | None = None
    user_jwt: str | None = None

    @classmethod
    def from_options(cls, token=None, user=None, password=None, nkey_seed=None,
                     creds_file=None, user_jwt=None) -> "Credentials":
        if isinstance(nkey_seed, str):
            nkey_seed = nkey_seed.strip().encode()
        if creds_file is not None:
            with open(creds_file, encoding="utf-8") as creds:
                user_jwt, nkey_seed = load_creds(creds.read())
        if user_jwt is not None and nkey_seed is None:
            raise ValueError("user_jwt needs the user's nkey seed to sign the server nonce")
        return cls(token=token, user=user, password=password, nkey_seed=nkey_seed,
                   user_jwt=user_jwt)

    def connect_fields(self, nonce: str | None, server=None) -> dict:
        """CONNECT fields for these credentials; URL credentials of ``server`` fill gaps."""
        fields = {}
        user = self.user or (server.user if server else None)
        password = self.password or (server.password if server else None)
        token = self.token or (server.token if server else None)
        if user is not None:
            fields["user"] = user
            fields["pass"] = password or ""
        if token is not None:
            fields["auth_token"] = token
        if self.nkey_seed is not None:
            if not nonce:
                raise ValueError("the server sent no nonce to sign; is nkey/JWT auth configured?")
            public_key, signature = sign_nonce(self.nkey_seed, nonce)
            fields["sig"] = signature
            if self.user_jwt is not None:
                fields["jwt"] = self.user_jwt
            else:
                fields["nkey"] = public_key
        return fields

    def __repr__(self):
        kinds = [name for name in ("token", "user", "nkey_seed", "user_jwt") if getattr(self, name)]
        return f"<Credentials {'+'.join(kinds) or 'none'}>"
