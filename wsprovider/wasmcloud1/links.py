"""Link definitions (``InterfaceLinkDefinition``) and the link store.

The provider is the *target* of a ``consumer`` link (a component calls us) and the
*source* of a ``handler`` link (we call the component). A put that matches a stored link
on (source, target, namespace, package, name) is a duplicate, as in the SDKs: hosts send
each link several times (HostData, the xkey subject, the legacy provider-id subjects).
"""

from __future__ import annotations

from typing import Any

import attr


class LinkError(ValueError):
    """A link definition is malformed, or its secrets cannot be opened."""


def secret_text(name, value) -> str:
    """A ``SecretValue`` (``{"kind": "String"|"Bytes", "value": ...}``) as text."""
    if not isinstance(value, dict) or value.get("kind") not in ("String", "Bytes"):
        raise LinkError(f"secret {name!r} is not a SecretValue {{\"kind\": \"String\"|\"Bytes\", \"value\": ...}}")
    if value["kind"] == "String":
        if not isinstance(value.get("value"), str):
            raise LinkError(f"secret {name!r}: a String secret's value must be a string")
        return value["value"]
    try:
        return bytes(value.get("value") or []).decode("utf-8")
    except (TypeError, ValueError):
        raise LinkError(f"secret {name!r}: a Bytes secret must be an array of bytes holding UTF-8 text") from None


def _strings(value, what) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise LinkError(f"link {what} must be an object of strings")
    return {str(k): v for k, v in value.items()}


def _sealed(value, what):
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(b, int) and 0 <= b <= 255 for b in value):
        raise LinkError(f"link {what} must be null or an array of byte values")
    return bytes(value)


@attr.s(frozen=True, kw_only=True)
class LinkDefinition:
    source_id: str = attr.ib()
    target: str = attr.ib()
    name: str = attr.ib(default="default")
    wit_namespace: str = attr.ib(default="")
    wit_package: str = attr.ib(default="")
    interfaces: tuple = attr.ib(default=())
    source_config: dict = attr.ib(factory=dict)
    target_config: dict = attr.ib(factory=dict)
    source_secrets: bytes | None = attr.ib(default=None, repr=lambda s: "sealed" if s else "None")
    target_secrets: bytes | None = attr.ib(default=None, repr=lambda s: "sealed" if s else "None")

    @classmethod
    def from_json(cls, obj: Any) -> "LinkDefinition":
        if not isinstance(obj, dict):
            raise LinkError("a link definition must be a JSON object")
        for field in ("source_id", "target"):
            if not isinstance(obj.get(field), str) or not obj[field]:
                raise LinkError(f"link definition field {field!r} must be a non-empty string")
        interfaces = obj.get("interfaces") or []
        if not isinstance(interfaces, list) or not all(isinstance(i, str) for i in interfaces):
            raise LinkError("link definition field 'interfaces' must be an array of strings")
        return cls(source_id=obj["source_id"], target=obj["target"], name=obj.get("name") or "default",
                   wit_namespace=str(obj.get("wit_namespace") or ""), wit_package=str(obj.get("wit_package") or ""),
                   interfaces=tuple(interfaces),
                   source_config=_strings(obj.get("source_config"), "source_config"),
                   target_config=_strings(obj.get("target_config"), "target_config"),
                   source_secrets=_sealed(obj.get("source_secrets"), "source_secrets"),
                   target_secrets=_sealed(obj.get("target_secrets"), "target_secrets"))

    def to_json(self) -> dict:
        return {"source_id": self.source_id, "target": self.target, "name": self.name,
                "wit_namespace": self.wit_namespace, "wit_package": self.wit_package,
                "interfaces": list(self.interfaces), "source_config": self.source_config,
                "target_config": self.target_config,
                "source_secrets": list(self.source_secrets) if self.source_secrets else None,
                "target_secrets": list(self.target_secrets) if self.target_secrets else None}

    @property
    def key(self) -> tuple:
        return (self.source_id, self.target, self.wit_namespace, self.wit_package, self.name)

    def role(self, provider_id: str) -> str | None:
        """"source" (we call ``target``: handler), "target" (``source_id`` calls us: consumer), or None."""
        if self.source_id == provider_id:
            return "source"
        if self.target == provider_id:
            return "target"
        return None

    def component(self, provider_id: str) -> str:
        """The other end of the link."""
        return self.target if self.source_id == provider_id else self.source_id

    def config_for(self, role: str) -> dict:
        return self.source_config if role == "source" else self.target_config

    def sealed_secrets_for(self, role: str):
        return self.source_secrets if role == "source" else self.target_secrets


class LinkStore:
    """Links by role and component, one per (role, component, name): what the SDKs keep."""

    def __init__(self, provider_id: str):
        self.provider_id = provider_id
        self._links: dict[tuple, LinkDefinition] = {}

    def put(self, link: LinkDefinition) -> str | None:
        """Store ``link``; return its role if new, None for a duplicate or a foreign link."""
        role = link.role(self.provider_id)
        if role is None:
            return None
        slot = (role, link.component(self.provider_id), link.name)
        stored = self._links.get(slot)
        if stored is not None and stored.key == link.key:
            return None
        self._links[slot] = link
        return role

    def delete(self, link: LinkDefinition):
        """Remove the stored link ``link`` names: (role, stored link), or None if unknown."""
        role = link.role(self.provider_id)
        if role is None:
            return None
        stored = self._links.pop((role, link.component(self.provider_id), link.name), None)
        return (role, stored) if stored is not None else None

    def get(self, role: str, component_id: str, name: str = "default"):
        return self._links.get((role, component_id, name))

    def __len__(self):
        return len(self._links)

    def all(self) -> list:
        return list(self._links.values())
