"""Parse the metadata server setting: `p2p`, or `etcd[s]://host:port[,host:port...]`."""

from __future__ import annotations

from dataclasses import dataclass

from .base import MetadataConfigError

DEFAULT_ETCD_PORT = 2379
_P2P = ("p2p", "embedded", "none")
_SCHEMES = {"etcd": False, "http": False, "etcds": True, "https": True}


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MetadataUrl:
    kind: str  # "p2p" | "etcd"
    endpoints: tuple[Endpoint, ...] = ()
    tls: bool = False


def parse_metadata_url(url: str) -> MetadataUrl:
    """`p2p`/`embedded` -> no store; `etcd://h:p,h:p` (or `http://`) -> etcd; `etcds://`
    (or `https://`) -> etcd over TLS; a bare `h:p[,h:p]` means etcd://."""
    text = (url or "").strip()
    if text.lower() in _P2P:
        return MetadataUrl("p2p")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "etcd", text
    scheme = scheme.lower()
    if scheme not in _SCHEMES:
        raise MetadataConfigError(
            f"metadata server {url!r}: unknown scheme {scheme!r}; use 'p2p', "
            "'etcd://host:port[,host:port]' or 'etcds://host:port' (TLS)"
        )
    endpoints = tuple(_parse_endpoint(url, part) for part in rest.rstrip("/").split(","))
    return MetadataUrl("etcd", endpoints, tls=_SCHEMES[scheme])


def _parse_endpoint(url: str, part: str) -> Endpoint:
    part = part.strip()
    if part.startswith("["):  # [v6addr]:port
        host, _, tail = part[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = part.partition(":")
    if not host or "/" in host:
        raise MetadataConfigError(f"metadata server {url!r}: bad endpoint {part!r} (host:port)")
    if not port_text:
        return Endpoint(host, DEFAULT_ETCD_PORT)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise MetadataConfigError(f"metadata server {url!r}: bad port in {part!r}")
    return Endpoint(host, int(port_text))
