"""HostData: the one line (base64 of JSON) a wasmCloud 1.x host writes on the provider's stdin.

``read_host_data(line)`` decodes and validates it; every problem is a ``HostDataError``
saying which field is wrong and what was expected. Secrets and key seeds are kept out of
``repr`` (and so out of logs).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Mapping

import attr

from . import xkeys
from .links import LinkDefinition, LinkError, secret_text

DEFAULT_RPC_URL = "nats://127.0.0.1:4222"
DEFAULT_RPC_TIMEOUT_MS = 2000
LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "critical")


class HostDataError(ValueError):
    """The HostData line is not what a wasmCloud 1.x host sends."""


def _hidden(value) -> str:
    return "***" if value else "''"


@attr.s(frozen=True, kw_only=True)
class HostData:
    host_id: str = attr.ib()
    lattice_rpc_prefix: str = attr.ib()
    provider_key: str = attr.ib()
    instance_id: str = attr.ib(default="")
    link_name: str = attr.ib(default="default")
    lattice_rpc_url: str = attr.ib(default=DEFAULT_RPC_URL)
    lattice_rpc_user_jwt: str = attr.ib(default="", repr=_hidden)
    lattice_rpc_user_seed: str = attr.ib(default="", repr=_hidden)
    env_values: dict = attr.ib(factory=dict)
    link_definitions: tuple = attr.ib(default=())
    cluster_issuers: tuple = attr.ib(default=())
    config: dict = attr.ib(factory=dict)
    secrets: dict = attr.ib(factory=dict, repr=lambda s: repr(sorted(s)))
    host_xkey_public_key: str = attr.ib(default="")
    provider_xkey_private_key: str = attr.ib(default="", repr=_hidden)
    default_rpc_timeout_ms: int = attr.ib(default=DEFAULT_RPC_TIMEOUT_MS)
    structured_logging: bool = attr.ib(default=False)
    log_level: str | None = attr.ib(default=None)
    otel_config: dict = attr.ib(factory=dict)

    @property
    def has_xkeys(self) -> bool:
        return bool(self.host_xkey_public_key and self.provider_xkey_private_key)

    @property
    def provider_xkey_public_key(self) -> str | None:
        return xkeys.public_from_seed(self.provider_xkey_private_key) if self.provider_xkey_private_key else None

    @property
    def link_put_key(self) -> str:
        """The subject token link puts arrive on: our xkey (hosts 1.1+), else the provider id."""
        return self.provider_xkey_public_key if self.has_xkeys else self.provider_key

    def open_secrets(self, sealed) -> dict:
        """A link's ``source_secrets``/``target_secrets`` (xkv1 sealed JSON) as {name: text}."""
        if not sealed:
            return {}
        if not self.has_xkeys:
            raise LinkError("the link carries sealed secrets but HostData has no xkeys to open them")
        try:
            plain = xkeys.open_sealed(bytes(sealed), self.provider_xkey_private_key, self.host_xkey_public_key)
        except (xkeys.XKeyError, TypeError, ValueError) as error:
            raise LinkError(f"cannot open the link's secrets: {error}") from None
        try:
            values = json.loads(plain)
        except ValueError:
            raise LinkError("the link's secrets opened but are not JSON") from None
        if not isinstance(values, dict):
            raise LinkError("the link's secrets are not a JSON object of name -> SecretValue")
        return {str(name): secret_text(name, value) for name, value in values.items()}


def read_host_data(line: bytes | str) -> HostData:
    """Decode and validate one stdin line (base64 of the HostData JSON)."""
    if isinstance(line, str):
        line = line.encode("ascii", "replace")
    line = line.strip()
    if not line:
        raise HostDataError("stdin held no HostData line: this program is started by a wasmCloud 1.x host, "
                            "which writes base64(JSON HostData) and a newline on its stdin "
                            "(for a manual start: echo <base64> | wsprovider-wasmcloud)")
    try:
        raw = base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise HostDataError("the HostData line is not base64 (standard alphabet, padded)") from None
    try:
        obj = json.loads(raw)
    except ValueError as error:
        raise HostDataError(f"the HostData line decodes but is not JSON: {error}") from None
    return parse_host_data(obj)


def _field(obj, name, kind, default=None, required=False, nonempty=False):
    if name not in obj or obj[name] is None:
        if required:
            raise HostDataError(f"HostData field {name!r} is missing")
        return default
    value = obj[name]
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise HostDataError(f"HostData field {name!r} must be {_kind(kind)}, got {type(value).__name__}")
    if nonempty and not value:
        raise HostDataError(f"HostData field {name!r} must not be empty")
    return value


def _kind(kind) -> str:
    return {str: "a string", int: "a number", bool: "true or false", dict: "an object", list: "an array"}.get(kind, str(kind))


def _string_map(obj, name) -> dict:
    value = _field(obj, name, dict, {})
    for key, item in value.items():
        if not isinstance(item, str):
            raise HostDataError(f"HostData field {name!r}: value of {key!r} must be a string")
    return dict(value)


def parse_host_data(obj: Any) -> HostData:
    if not isinstance(obj, dict):
        raise HostDataError("HostData must be a JSON object")
    timeout = _field(obj, "default_rpc_timeout_ms", int, DEFAULT_RPC_TIMEOUT_MS)
    if timeout <= 0:
        raise HostDataError("HostData field 'default_rpc_timeout_ms' must be positive")
    level = _field(obj, "log_level", str)
    if level is not None and level.lower() not in LOG_LEVELS:
        raise HostDataError(f"HostData field 'log_level': {level!r} is not one of {', '.join(LOG_LEVELS)}")
    secrets_obj = _field(obj, "secrets", dict, {})
    try:
        secrets = {str(k): secret_text(k, v) for k, v in secrets_obj.items()}
        links = tuple(LinkDefinition.from_json(ld) for ld in _field(obj, "link_definitions", list, []))
    except LinkError as error:
        raise HostDataError(f"HostData: {error}") from None
    host_xkey = _field(obj, "host_xkey_public_key", str, "")
    provider_xkey = _field(obj, "provider_xkey_private_key", str, "")
    try:
        if host_xkey:
            xkeys.decode_public(host_xkey)
        if provider_xkey:
            xkeys.decode_seed(provider_xkey)
    except xkeys.XKeyError as error:
        raise HostDataError(f"HostData xkeys: {error}") from None
    return HostData(
        host_id=_field(obj, "host_id", str, required=True, nonempty=True),
        lattice_rpc_prefix=_field(obj, "lattice_rpc_prefix", str, required=True, nonempty=True),
        provider_key=_field(obj, "provider_key", str, required=True, nonempty=True),
        instance_id=_field(obj, "instance_id", str, ""),
        link_name=_field(obj, "link_name", str, "default") or "default",
        lattice_rpc_url=_field(obj, "lattice_rpc_url", str, "") or DEFAULT_RPC_URL,
        lattice_rpc_user_jwt=_field(obj, "lattice_rpc_user_jwt", str, ""),
        lattice_rpc_user_seed=_field(obj, "lattice_rpc_user_seed", str, ""),
        env_values=_string_map(obj, "env_values"),
        link_definitions=links,
        cluster_issuers=tuple(_field(obj, "cluster_issuers", list, [])),
        config=_string_map(obj, "config"),
        secrets=secrets,
        host_xkey_public_key=host_xkey,
        provider_xkey_private_key=provider_xkey,
        default_rpc_timeout_ms=timeout,
        structured_logging=_field(obj, "structured_logging", bool, False),
        log_level=level.lower() if level else None,
        otel_config=_field(obj, "otel_config", dict, {}),
    )


def encode_host_data(obj: Mapping) -> bytes:
    """The stdin line for ``obj`` as the host writes it (for tests and manual starts)."""
    return base64.b64encode(json.dumps(obj).encode()) + b"\r\n"
