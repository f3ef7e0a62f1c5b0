"""Server-mode authentication: who may open a session, and what that session may use.

A peer presents one credential in the opening handshake, either as
``Authorization: Bearer <credential>`` or, for browsers (which cannot set headers on a
WebSocket upgrade), as the ``token`` query parameter. The credential is one of the
configured static tokens (``AUTH_TOKEN``, ``AUTH_TOKENS``; compared in constant time) or
a JWT (``JWT_SECRET`` for HS*, ``JWT_PUBLIC_KEY`` for RS*/PS*/ES*/EdDSA) whose ``exp``,
``nbf``, ``aud`` and ``iss`` are checked. A JWT may narrow the session's permissions with
the ``JWT_PUBLISH_CLAIM`` / ``JWT_SUBSCRIBE_CLAIM`` claims; it can never widen them.

Refusals raise ``AuthError`` whose text is safe to log and to send: it never contains
the credential.
"""

from __future__ import annotations

import hmac
from typing import Mapping

import attr

from .config import ConfigError
from .subjects import Permissions, SubjectError, check_pattern

HMAC_ALGORITHMS = frozenset(("HS256", "HS384", "HS512"))
QUERY_PARAM = "token"


class AuthError(Exception):
    """The handshake is refused. ``reason`` is a short label for metrics (missing, invalid, expired, ...)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@attr.s(slots=True, frozen=True)
class Identity:
    """Who a session is, and what it may do (``None``: the service's defaults)."""

    principal: str = attr.ib()
    method: str = attr.ib()                       # "token" or "jwt"
    publish: Permissions | None = attr.ib(default=None)
    subscribe: Permissions | None = attr.ib(default=None)
    expires_at: float | None = attr.ib(default=None)


def credential_from(headers: Mapping[str, str], params: Mapping[str, list]) -> str | None:
    """The presented credential: the bearer token, else the ``token`` query parameter."""
    value = headers.get("authorization")
    if value:
        scheme, _, rest = value.strip().partition(" ")
        if scheme.lower() == "bearer" and rest.strip():
            return rest.strip()
    values = params.get(QUERY_PARAM) if params else None
    if values:
        return values[0]
    return None


class Authenticator:
    """Checks credentials. Build with ``from_config``; ``None`` there means auth is off."""

    def __init__(self, tokens=(), jwt_keys=None, algorithms=(), audience=(), issuer=None, leeway=30.0,
                 publish_claim="ws_pub", subscribe_claim="ws_sub", publish=None, subscribe=None):
        self._tokens = tuple(t.encode("utf-8") for t in tokens)
        self._jwt_keys = dict(jwt_keys or {})     # algorithm -> key
        self._algorithms = tuple(algorithms)
        self._audience = list(audience) or None
        self._issuer = issuer
        self._leeway = leeway
        self._publish_claim = publish_claim
        self._subscribe_claim = subscribe_claim
        self._publish = publish if publish is not None else Permissions()
        self._subscribe = subscribe if subscribe is not None else Permissions()

    @classmethod
    def from_config(cls, config) -> "Authenticator | None":
        tokens = tuple(t for t in ((config.auth_token,) if config.auth_token else ()) + tuple(config.auth_tokens))
        keys = {}
        algorithms = tuple(config.jwt_algorithms)
        if config.jwt_secret or config.jwt_public_key:
            if not algorithms:
                algorithms = (("HS256",) if config.jwt_secret else ()) + (
                    ("RS256", "ES256") if config.jwt_public_key else ())
            public_key = None
            if config.jwt_public_key:
                try:
                    with open(config.jwt_public_key, "rb") as f:
                        pem = f.read()
                    from cryptography.hazmat.primitives.serialization import load_pem_public_key
                    public_key = load_pem_public_key(pem)
                except (OSError, ValueError) as e:
                    raise ConfigError(f"JWT_PUBLIC_KEY: cannot load a PEM public key from "
                                      f"{config.jwt_public_key!r}: {e}") from None
            for alg in algorithms:
                if alg in HMAC_ALGORITHMS:
                    if not config.jwt_secret:
                        raise ConfigError(f"JWT_ALGORITHMS: {alg} needs JWT_SECRET")
                    keys[alg] = config.jwt_secret
                else:
                    if public_key is None:
                        raise ConfigError(f"JWT_ALGORITHMS: {alg} needs JWT_PUBLIC_KEY")
                    keys[alg] = public_key
        elif algorithms:
            raise ConfigError("JWT_ALGORITHMS: set JWT_SECRET or JWT_PUBLIC_KEY too")
        if not tokens and not keys:
            return None
        return cls(tokens, keys, algorithms, config.jwt_audience, config.jwt_issuer, config.jwt_leeway_sec,
                   config.jwt_publish_claim, config.jwt_subscribe_claim,
                   config.publish_permissions(), config.subscribe_permissions())

    @property
    def accepts_jwt(self) -> bool:
        return bool(self._jwt_keys)

    def authenticate(self, headers: Mapping[str, str], params: Mapping[str, list]) -> Identity:
        """Return the session's ``Identity`` or raise ``AuthError``."""
        credential = credential_from(headers, params)
        if credential is None:
            raise AuthError(f"authentication required: send 'Authorization: Bearer <token>' or "
                            f"the '{QUERY_PARAM}' query parameter", "missing")
        presented = credential.encode("utf-8", "surrogateescape")
        matched = False
        for token in self._tokens:  # no early exit: the time taken does not say which token matched
            matched |= hmac.compare_digest(presented, token)
        if matched:
            return Identity(principal="token", method="token")
        if self._jwt_keys and credential.count(".") == 2:
            return self._verify_jwt(credential)
        raise AuthError("invalid credentials", "invalid")

    def _verify_jwt(self, credential: str) -> Identity:
        import jwt
        try:
            header = jwt.get_unverified_header(credential)
        except Exception:  # PyJWTError, and whatever a garbled header makes the decoder raise
            raise AuthError("invalid credentials: malformed JWT", "invalid") from None
        if not isinstance(header, dict):
            raise AuthError("invalid credentials: malformed JWT", "invalid")
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthError("invalid credentials: malformed JWT (no algorithm)", "invalid")
        key = self._jwt_keys.get(alg)
        if key is None:
            raise AuthError(f"invalid credentials: JWT algorithm {str(alg)[:16]!r} is not accepted "
                            f"(accepted: {', '.join(self._algorithms)})", "invalid")
        options = {"require": ["exp"]}
        try:
            claims = jwt.decode(credential, key, algorithms=[alg], audience=self._audience,
                                issuer=self._issuer, leeway=self._leeway, options=options)
        except jwt.ExpiredSignatureError:
            raise AuthError("invalid credentials: the JWT has expired", "expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("invalid credentials: the JWT is not valid yet (nbf/iat)", "not_yet_valid") from None
        except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as e:
            if isinstance(e, jwt.MissingRequiredClaimError) and e.claim not in ("aud",):
                raise AuthError(f"invalid credentials: the JWT lacks the {e.claim!r} claim", "claims") from None
            raise AuthError("invalid credentials: the JWT's audience is not accepted", "audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("invalid credentials: the JWT's issuer is not accepted", "issuer") from None
        except jwt.InvalidSignatureError:
            raise AuthError("invalid credentials: bad JWT signature", "signature") from None
        except jwt.PyJWTError as e:
            raise AuthError(f"invalid credentials: {type(e).__name__}", "invalid") from None
        except Exception as e:  # e.g. an ES256 header with an RSA key: the key cannot check it
            raise AuthError(f"invalid credentials: the JWT cannot be checked with the configured key "
                            f"({type(e).__name__})", "invalid") from None
        publish = self._narrow(self._publish, claims, self._publish_claim)
        subscribe = self._narrow(self._subscribe, claims, self._subscribe_claim)
        principal = claims.get("sub")
        return Identity(principal=str(principal) if principal is not None else "jwt", method="jwt",
                        publish=publish, subscribe=subscribe, expires_at=float(claims["exp"]))

    @staticmethod
    def _narrow(base: Permissions, claims: dict, name: str) -> Permissions | None:
        if name not in claims:
            return None
        value = claims[name]
        if isinstance(value, str):
            allow, deny = [value], []
        elif isinstance(value, list):
            allow, deny = value, []
        elif isinstance(value, dict):
            allow, deny = value.get("allow"), value.get("deny") or []
        else:
            raise AuthError(f"invalid credentials: claim {name!r} must be a list of subject patterns or "
                            "{allow, deny}", "claims")
        try:
            allow = None if allow is None else [check_pattern(str(p)) for p in allow]
            deny = [check_pattern(str(p)) for p in deny]
        except (SubjectError, TypeError) as e:
            raise AuthError(f"invalid credentials: claim {name!r}: {e}", "claims") from None
        return base.narrowed(allow, deny)
