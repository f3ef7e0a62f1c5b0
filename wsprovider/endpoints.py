"""Turn the ``URI`` setting of server mode into a Twisted server endpoint description."""

from __future__ import annotations

from urllib.parse import urlsplit

from .config import ConfigError

DEFAULT_SERVER_ENDPOINT = "tcp:8080:interface=127.0.0.1"

_ENDPOINT_PREFIXES = ("tcp:", "tcp6:", "ssl:", "unix:", "systemd:", "le:", "lets:", "txtorcon:", "onion:")


def server_endpoint_description(uri: str | None) -> str:
    """Accept the seed's ``host:port``, a ``ws://host:port`` URL, or a Twisted endpoint string."""
    if not uri:
        return DEFAULT_SERVER_ENDPOINT
    uri = uri.strip()
    if uri.startswith(_ENDPOINT_PREFIXES):
        return uri
    if uri.startswith(("ws://", "http://")):
        parts = urlsplit(uri)
        return _tcp(parts.hostname or "0.0.0.0", parts.port or 80, uri)
    if uri.startswith(("wss://", "https://")):
        raise ConfigError(f"URI: {uri!r}: for TLS in server mode use an endpoint string like "
                          "'ssl:8443:privateKey=key.pem:certKey=cert.pem'")
    if uri.startswith("["):  # [::1]:8080
        host, sep, port = uri[1:].partition("]:")
        if not sep:
            raise ConfigError(f"URI: {uri!r} is not valid; accepted values: host:port, [ipv6]:port, "
                              "or a Twisted endpoint string such as tcp:8080:interface=127.0.0.1")
        return _tcp(host, port, uri)
    host, sep, port = uri.rpartition(":")
    if not sep or not host:
        if uri.isdigit():
            return _tcp("0.0.0.0", uri, uri)
        raise ConfigError(f"URI: {uri!r} is not valid; accepted values: host:port (0.0.0.0:8080), "
                          "[ipv6]:port, or a Twisted endpoint string such as tcp:8080:interface=127.0.0.1")
    return _tcp(host, port, uri)


def _tcp(host: str, port, original: str) -> str:
    try:
        port = int(port)
    except (TypeError, ValueError):
        raise ConfigError(f"URI: {original!r}: port {port!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"URI: {original!r}: port {port} is out of range 0..65535")
    if ":" in host:
        return f"tcp6:{port}:interface=" + host.replace(":", "\\:")
    return f"tcp:{port}:interface={host}"
