"""One connection to one etcd member, through `pyetcd`, with errors that say what to check.

`connect()` tries the configured endpoints in order and returns the first that answers an
authenticated read of our prefix (which proves reachability, TLS, credentials and permission
at once). A connection is never repaired: after any failure the caller drops it and connects
anew. That sidesteps three habits of pyetcd's client: it marks a failed endpoint unusable for
300 s, it authenticates only once (etcd forgets "simple" auth tokens when it restarts), and
its channels would otherwise share gRPC's global reconnect backoff. A fourth, its use of gRPC
call credentials for the auth token, is undone in `connect()` (see there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import pyetcd
from pyetcd import exceptions as etcd_exc
from pyetcd.events import DeleteEvent, PutEvent

from .base import MetadataConfigError, MetadataUnavailableError
from .url import Endpoint

log = logging.getLogger(__name__)

# Each connection gets its own subchannel pool and a short reconnect backoff, so a fresh
# connection after an etcd restart dials at once instead of waiting out a shared backoff.
_GRPC_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[Endpoint, ...]
    tls: bool = False
    user: str | None = None
    password: str | None = None
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    timeout_s: float = 2.0  # per call, and per endpoint when connecting

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise MetadataConfigError("etcd: no endpoints given")
        if (self.user is None) != (self.password is None):
            raise MetadataConfigError("etcd: give both user and password, or neither")
        if (self.cert is None) != (self.key is None):
            raise MetadataConfigError("etcd: give both cert and key (client certificate), "
                                      "or neither")
        if self.tls and self.ca_cert is None:
            raise MetadataConfigError(
                "etcd over TLS (etcds://, cert/key given) needs ca_cert "
                "(MOONCAKE_VLLM_ETCD_CA_CERT): the CA that signed etcd's certificate"
            )
        if self.timeout_s <= 0:
            raise MetadataConfigError(f"etcd: timeout_s must be > 0, got {self.timeout_s}")

    @property
    def endpoint_list(self) -> str:
        return ",".join(map(str, self.endpoints))


def describe_error(e: BaseException) -> str:
    """The most specific text in a pyetcd/gRPC error (pyetcd hides the gRPC one as context)."""
    for err in (e, e.__context__, e.__cause__):
        if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
            code, details = err.code(), err.details()
            return f"{code.name}: {details}"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# gRPC codes that mean "this connection or this moment", not "this request": retry elsewhere.
_TRANSIENT_CODES = {
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def is_transient(e: BaseException) -> bool:
    """False for errors a reconnect cannot cure (permission denied, invalid request)."""
    for err in (e, e.__context__):
        if isinstance(err, grpc.RpcError) and hasattr(err, "code"):
            return err.code() in _TRANSIENT_CODES
    return True


class EtcdConnection:
    """A pyetcd client bound to the one endpoint that answered."""

    def __init__(self, client: pyetcd.Etcd3Client, endpoint: Endpoint) -> None:
        self.client = client
        self.endpoint = endpoint

    def list_prefix(self, prefix: str) -> tuple[int, list[tuple[str, bytes, int]]]:
        """(revision, [(key, value, lease_id), ...]) of everything under `prefix`."""
        resp = self.client.get_prefix_response(prefix)
        kvs = [(kv.key.decode("utf-8", "replace"), bytes(kv.value), int(kv.lease))
               for kv in resp.kvs]
        return int(resp.header.revision), kvs

    def put(self, key: str, value: bytes, lease_id: int) -> int:
        return int(self.client.put(key, value, lease=lease_id).header.revision)

    def delete(self, key: str) -> int:
        return int(self.client.delete(key, return_response=True).header.revision)

    def grant(self, ttl_s: int) -> int:
        return int(self.client.lease(ttl_s).id)

    def keepalive(self, lease_id: int) -> int:
        """Renew the lease; returns its TTL, 0 when etcd no longer knows it."""
        responses = list(self.client.refresh_lease(lease_id))
        return int(responses[0].TTL) if responses else 0

    def revoke(self, lease_id: int) -> None:
        self.client.revoke_lease(lease_id)

    def watch_prefix(
        self, prefix: str, start_revision: int, callback: Callable[[Any], None]
    ) -> int:
        return int(self.client.add_watch_prefix_callback(
            prefix, callback, start_revision=start_revision
        ))

    def close(self) -> None:
        try:
            self.client.close()
        except Exception as e:  # closing a broken channel must not mask the real error
            log.debug("closing etcd client for %s: %s", self.endpoint, e)


def watch_events(response: Any) -> list[tuple[str, str, bytes]]:
    """[(\"put\"|\"delete\", key, value), ...] of one pyetcd watch response."""
    out: list[tuple[str, str, bytes]] = []
    for ev in response.events:
        key = ev.key.decode("utf-8", "replace")
        if isinstance(ev, PutEvent):
            out.append(("put", key, bytes(ev.value)))
        elif isinstance(ev, DeleteEvent):
            out.append(("delete", key, b""))
    return out


def connect(settings: EtcdSettings, probe_key: str,
            endpoints: Sequence[Endpoint] | None = None) -> EtcdConnection:
    """The first endpoint that serves an authenticated read of `probe_key`, or an error that
    names every endpoint tried, why it failed, and what to check."""
    failures: list[str] = []
    for ep in endpoints or settings.endpoints:
        client = None
        try:
            client = pyetcd.client(
                host=ep.host, port=ep.port,
                ca_cert=settings.ca_cert if settings.tls else None,
                cert_key=settings.key, cert_cert=settings.cert,
                timeout=settings.timeout_s,
                user=settings.user, password=settings.password,
                grpc_options=_GRPC_OPTIONS,
            )
            # pyetcd sends the auth token twice: as plain request metadata and as gRPC call
            # credentials. gRPC refuses call credentials on a plain (non-TLS) channel, which
            # would make user/password unusable without TLS; the metadata alone is what
            # etcd reads, so drop the call credentials.
            client.call_credentials = None
            client.get(probe_key)
            return EtcdConnection(client, ep)
        except (grpc.RpcError, etcd_exc.Etcd3Exception, OSError, ValueError) as e:
            failures.append(f"{ep}: {describe_error(e)}")
            if client is not None:
                EtcdConnection(client, ep).close()
    raise MetadataUnavailableError(
        f"cannot use etcd at {settings.endpoint_list} "
        f"({'TLS' if settings.tls else 'plain'}, "
        f"{'user ' + repr(settings.user) if settings.user else 'no auth'}): "
        + "; ".join(failures)
        + ". Check that etcd is running and listening on that address, that the scheme "
        "matches its listener (etcd:// for http, etcds:// with ca_cert for https, cert/key if "
        "it demands client certificates), and the user/password if auth is enabled."
    )
