"""Metadata and discovery: segment descriptors and the instance registry of a cluster.

    from mooncake_vllm.metadata import open_metadata, InstanceInfo, KVLayoutRecord
    md = open_metadata("etcd://10.0.0.5:2379,10.0.0.6:2379", namespace="prod", ttl_s=10)
    md.publish_segment(name, engine.descriptor())
    md.register_instance(InstanceInfo(...))
    peers = md.list_instances(role="decode")       # from the local cache, no network
    md.close()                                     # removes our keys

Metadata server URL (argument `url`, else MOONCAKE_VLLM_METADATA_SERVER, else `p2p`):
  `p2p` (or `embedded`)             no store; see `embedded` for what that mode does
  `etcd://host:port[,host:port]`    etcd v3, plain gRPC; endpoints tried in order
  `etcds://host:port[,host:port]`   etcd v3 over TLS (needs ca_cert)
  (`http://` and `https://` are accepted as aliases; the port defaults to 2379)

Options (argument, else environment variable; arguments win):
  namespace   MOONCAKE_VLLM_NAMESPACE       cluster namespace, default "default": several
                                            deployments can share one etcd
  ttl_s       MOONCAKE_VLLM_METADATA_TTL_S  lease TTL in seconds (>= 2), default 10: a dead
                                            instance disappears from discovery within it
  user        MOONCAKE_VLLM_ETCD_USER       etcd user (with password)
  password    MOONCAKE_VLLM_ETCD_PASSWORD
  ca_cert     MOONCAKE_VLLM_ETCD_CA_CERT    PEM CA of etcd's server certificate; implies TLS
  cert, key   MOONCAKE_VLLM_ETCD_CERT/_KEY  PEM client certificate and key (mutual TLS)
  timeout_s   MOONCAKE_VLLM_ETCD_TIMEOUT_S  per-call and per-endpoint connect deadline, 2 s

`open_metadata` raises `MetadataConfigError` for a bad setting (naming it) and
`MetadataUnavailableError` when no etcd endpoint can be used (naming each endpoint, the cause,
and what to check), within about `timeout_s` per endpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from .base import (
    ROLES,
    SCHEMA_VERSION,
    InstanceCallback,
    InstanceInfo,
    KVLayoutRecord,
    MalformedValueError,
    MetadataConfigError,
    MetadataError,
    MetadataStore,
    MetadataUnavailableError,
    ModelShape,
)
from .embedded import EmbeddedMetadata
from .store_record import StoreInfo
from .url import MetadataUrl, parse_metadata_url

__all__ = [
    "ROLES", "SCHEMA_VERSION", "EmbeddedMetadata", "InstanceCallback", "InstanceInfo",
    "KVLayoutRecord", "MalformedValueError", "MetadataConfigError", "MetadataError",
    "MetadataStore",
    "MetadataUnavailableError", "MetadataUrl", "ModelShape", "ENV_VARS", "open_metadata",
    "parse_metadata_url", "StoreInfo",
]

ENV_METADATA_SERVER = "MOONCAKE_VLLM_METADATA_SERVER"
ENV_NAMESPACE = "MOONCAKE_VLLM_NAMESPACE"
ENV_TTL_S = "MOONCAKE_VLLM_METADATA_TTL_S"
ENV_VARS = {
    "url": ENV_METADATA_SERVER,
    "namespace": ENV_NAMESPACE,
    "ttl_s": ENV_TTL_S,
    "user": "MOONCAKE_VLLM_ETCD_USER",
    "password": "MOONCAKE_VLLM_ETCD_PASSWORD",
    "ca_cert": "MOONCAKE_VLLM_ETCD_CA_CERT",
    "cert": "MOONCAKE_VLLM_ETCD_CERT",
    "key": "MOONCAKE_VLLM_ETCD_KEY",
    "timeout_s": "MOONCAKE_VLLM_ETCD_TIMEOUT_S",
}
DEFAULT_NAMESPACE = "default"
DEFAULT_TTL_S = 10.0
DEFAULT_TIMEOUT_S = 2.0


def open_metadata(
    url: str | None = None,
    *,
    namespace: str | None = None,
    ttl_s: float | None = None,
    user: str | None = None,
    password: str | None = None,
    ca_cert: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    timeout_s: float | None = None,
    instances: Iterable[InstanceInfo] = (),
) -> MetadataStore:
    """Open the metadata store `url` names (see the module docstring for every option).

    `instances` seeds the embedded store with a static topology; etcd ignores it.
    """
    url = url if url is not None else os.environ.get(ENV_METADATA_SERVER, "p2p")
    parsed = parse_metadata_url(url)
    ns = namespace if namespace is not None else _env("namespace") or DEFAULT_NAMESPACE
    if parsed.kind == "p2p":
        return EmbeddedMetadata(ns, instances)

    from .etcd_client import EtcdSettings  # imports grpc/pyetcd only when etcd is used
    from .etcd_store import EtcdMetadata

    ca_cert = ca_cert if ca_cert is not None else _env("ca_cert")
    cert = cert if cert is not None else _env("cert")
    key = key if key is not None else _env("key")
    settings = EtcdSettings(
        endpoints=parsed.endpoints,
        tls=parsed.tls or any(x is not None for x in (ca_cert, cert, key)),
        user=user if user is not None else _env("user"),
        password=password if password is not None else _env("password"),
        ca_cert=ca_cert,
        cert=cert,
        key=key,
        timeout_s=timeout_s if timeout_s is not None else _env_float("timeout_s",
                                                                    DEFAULT_TIMEOUT_S),
    )
    ttl = ttl_s if ttl_s is not None else _env_float("ttl_s", DEFAULT_TTL_S)
    return EtcdMetadata(settings, namespace=ns, ttl_s=ttl)


def _env(option: str) -> str | None:
    value = os.environ.get(ENV_VARS[option], "")
    return value or None


def _env_float(option: str, default: float) -> float:
    text = _env(option)
    if text is None:
        return default
    try:
        return float(text)
    except ValueError:
        raise MetadataConfigError(
            f"{ENV_VARS[option]}={text!r} is not a number of seconds"
        ) from None
