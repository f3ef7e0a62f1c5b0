"""Server addresses and the rotating pool of servers the client (re)connects to."""

import ipaddress
import random
from urllib.parse import unquote, urlsplit

import attrs

DEFAULT_PORT = 4222


@attrs.frozen
class ServerAddress:
    """One NATS server URL: ``nats://[user:password@|token@]host[:port]`` or ``tls://...``."""

    host: str
    port: int
    tls: bool = False
    user: str | None = None
    password: str | None = None
    token: str | None = None
    discovered: bool = False
    #: name to verify the TLS certificate against when ``host`` is a learned IP address
    tls_name: str | None = None

    @classmethod
    def parse(cls, url: str, discovered: bool = False) -> "ServerAddress":
        if "://" not in url:
            url = "nats://" + url
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "tls"):
            raise ValueError(f"unsupported NATS URL scheme {parts.scheme!r} in {url!r}; "
                             "use nats:// or tls://")
        if not parts.hostname:
            raise ValueError(f"NATS URL {url!r} has no host")
        user = password = token = None
        if parts.username is not None and parts.password is not None:
            user, password = unquote(parts.username), unquote(parts.password)
        elif parts.username:
            token = unquote(parts.username)
        return cls(host=parts.hostname, port=parts.port or DEFAULT_PORT,
                   tls=parts.scheme == "tls", user=user, password=password, token=token,
                   discovered=discovered)

    @property
    def netloc(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'tls' if self.tls else 'nats'}://{self.netloc}"


class ServerPool:
    """The servers to try, in rotation; grows with ``connect_urls`` learned from INFO."""

    def __init__(self, urls, randomize: bool = True, rng: random.Random | None = None):
        if isinstance(urls, str):
            urls = [urls]
        self.servers = [ServerAddress.parse(url) for url in urls]
        if not self.servers:
            raise ValueError("at least one NATS server URL is required")
        self._rng = rng or random.Random()
        if randomize:
            self._rng.shuffle(self.servers)
        self._next = 0

    def next_server(self) -> ServerAddress:
        server = self.servers[self._next % len(self.servers)]
        self._next = (self._next + 1) % len(self.servers)
        return server

    def learn(self, connect_urls, tls: bool, via: ServerAddress | None = None) -> list:
        """Add servers the cluster advertises that we do not know yet; return the new ones.

        Advertised URLs carry no credentials: those of ``via`` (the server that advertised
        them, e.g. ``nats://user:pass@host``) are used for them, as for ``via`` itself.
        Servers advertised by IP keep the hostname of ``via`` for TLS verification.
        """
        known = {server.netloc for server in self.servers}
        added = []
        for url in connect_urls or ():
            server = ServerAddress.parse(url if "://" in url else ("tls://" if tls else "nats://") + url,
                                         discovered=True)
            if via is not None and server.user is None and server.token is None:
                server = attrs.evolve(server, user=via.user, password=via.password, token=via.token)
            if via is not None and _is_ip(server.host):
                tls_name = via.tls_name or (None if _is_ip(via.host) else via.host)
                server = attrs.evolve(server, tls_name=tls_name)
            if server.netloc not in known:
                known.add(server.netloc)
                added.append(server)
        self.servers.extend(added)
        return added


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
