"""ConnectorConfig: the connector's settings, parsed once and validated.

Sources, later wins: defaults, `MOONCAKE_VLLM_<KEY>` environment variables, then vLLM's
`kv_connector_extra_config` (the explicit per-instance configuration beats the ambient one).
Every error names the key, where it came from and the bad value.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mooncake_vllm.security import MIN_TOKEN_CHARS, is_loopback_host, is_wildcard_host

ENV_PREFIX = "MOONCAKE_VLLM_"
# The longest a control message can take from D's send to P's handler: the channel's
# heartbeat drops a connection that stops answering within this, and the messages queued on
# it with it (control.py), so a registration cannot reach P after D has given up on it.
CONTROL_DELIVERY_S = 5.0
# Keys that existed once, with what replaced them.
_REMOVED = {
    "abort_ack_timeout_s": "D now takes its blocks back when P confirms, or at the write "
                           "horizon derived from transfer_timeout_s and engine_timeout_s",
    "measure_non_overlapped": "it is a benchmark hook now, not a setting: set "
                              "MOONCAKE_VLLM_BENCH_NON_OVERLAPPED=1 in the prefill instance's "
                              "environment",
}


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message names the key and value."""


def _default_hostname() -> str:
    # vLLM's own knob for "the address other nodes reach me at"; loopback keeps a single-host
    # set-up working with nothing configured.
    return os.environ.get("VLLM_HOST_IP") or "127.0.0.1"


@dataclass(frozen=True)
class ConnectorConfig:
    # "p2p": no store, D sends its segment descriptor inside the registration.
    # "etcd://host:port[,host:port]": segments and instances are published in etcd
    # ("etcds://": over TLS).
    metadata_server: str = "p2p"
    namespace: str = "default"
    # Transfer engine.
    protocol: str = "tcp"  # "tcp" | "rdma" | "auto"
    hostname: str = field(default_factory=_default_hostname)
    engine_port: int = 0
    # Shared secret of the cluster: engine connections and control frames prove it, and
    # kv_transfer_params must carry the conductor's signature made with it.
    cluster_token: str | None = None
    # Listen on a non-loopback address with no cluster_token: anyone who reaches the ports
    # can then read and write the KV cache. Refused unless this is set (and then warned).
    insecure: bool = False
    connections_per_peer: int = 4
    rdma_devices: tuple[str, ...] | None = None
    # Control channel: base port of the workers' pyzmq sockets (rank r binds base + r);
    # 0 picks free ports.
    control_port: int = 0
    # The instance's HTTP URL, published in etcd so the proxy can route to it.
    advertise_url: str = ""
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # Deadlines (seconds).
    registration_timeout_s: float = 30.0  # P: wait for D's registration
    transfer_timeout_s: float = 60.0  # D: registration sent -> "done" received
    # D, pipelined loads (its forward pass waits, so its whole batch waits): give up when P
    # has said nothing of the transfer for this long. P repeats its progress every
    # PIPELINE_HEARTBEAT_S while the transfer is open, queued or not: only a P that is gone
    # (or cut off) falls silent.
    # Long enough for a live P whose control thread the host starves for seconds (seen on
    # loaded 2-core hosts: a worker missing 2 s Pings while its model runs), short
    # enough that a vanished P costs a pipelined step seconds, not transfer_timeout_s.
    pipeline_silence_timeout_s: float = 15.0
    engine_timeout_s: float = 30.0  # one batch of writes
    metadata_ttl_s: float = 10.0
    # GPU KV over TCP goes through pinned host staging buffers ("auto": when KV is on a
    # device and the transport cannot read device memory).
    staging: str = "auto"  # "auto" | "on" | "off"
    staging_buffer_mb: int = 256
    # The cluster KV pool (store/, `mooncake-vllm store` nodes found in etcd): before a
    # prefill, the prompt's blocks beyond the local prefix cache are read from the pool; after
    # it, new full blocks are written there. Entries pass through a host buffer of
    # `pool_buffer_mb`, so pool I/O never touches blocks vLLM may free or reuse; a pool slower
    # than `pool_lookup_timeout_s`, full, or missing a node is a miss and a recompute.
    pool: bool = False
    pool_buffer_mb: int = 256
    pool_lookup_timeout_s: float = 1.0

    def last_write_landing_s(self, wait_s: float) -> float:
        """From D's registration (asking P to write for `wait_s`) to the moment no write of this
        instance's can land any more, whatever happens: the registration arrives within twice
        CONTROL_DELIVERY_S (handed to a connected peer within one, and a connection that stops
        carrying it is dropped by the heartbeat within another), P posts nothing after
        `wait_s` from its arrival, the engine fails
        a batch (aborting its connection) by `engine_timeout_s`, and bytes the kernel still
        held then are delivered or dropped within the engine's TCP_USER_TIMEOUT more (the
        engine timeout, at least 2 s)."""
        user_timeout = max(2.0, self.engine_timeout_s)
        return wait_s + 2 * CONTROL_DELIVERY_S + self.engine_timeout_s + user_timeout + 2.0

    @property
    def write_horizon_s(self) -> float:
        """D: how long after registering it takes lent blocks back without P's word."""
        return self.last_write_landing_s(self.transfer_timeout_s)

    def exposure_refusal(self) -> str | None:
        """Why this instance must not start listening as configured; None when it may."""
        from mooncake_vllm.security import is_loopback_host

        if self.cluster_token or self.insecure or is_loopback_host(self.hostname):
            return None
        return (f"hostname={self.hostname!r} is not a loopback address and no cluster_token "
                "is set: anyone who reaches the engine or control ports could read and "
                "overwrite the KV cache. Set cluster_token (MOONCAKE_VLLM_CLUSTER_TOKEN) on "
                "every instance and the conductor, or set insecure=true to accept the risk "
                "on an isolated network")

    @property
    def uses_etcd(self) -> bool:
        return self.metadata_server.startswith(("etcd://", "etcds://"))

    @classmethod
    def from_sources(
        cls, extra: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> ConnectorConfig:
        env = os.environ if env is None else env
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name in known:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = _coerce(name, raw, f"environment {ENV_PREFIX}{name.upper()}")
        for key, raw in (extra or {}).items():
            if key in _REMOVED:
                raise ConfigError(f"kv_connector_extra_config: {key!r} was removed: "
                                  f"{_REMOVED[key]}")
            if key not in known:
                raise ConfigError(
                    f"kv_connector_extra_config: unknown key {key!r} (value {raw!r}); "
                    f"known keys: {', '.join(sorted(known))}"
                )
            values[key] = _coerce(key, raw, "kv_connector_extra_config")
        cfg = cls(**values)
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{key}={getattr(self, key)!r}: {why}")

        if self.metadata_server != "p2p" and not self.uses_etcd:
            raise bad("metadata_server", "expected 'p2p', 'etcd://host:port' or "
                      "'etcds://host:port' (TLS)")
        if self.protocol not in ("tcp", "rdma", "auto"):
            raise bad("protocol", "expected 'tcp', 'rdma' or 'auto'")
        if self.staging not in ("auto", "on", "off"):
            raise bad("staging", "expected 'auto', 'on' or 'off'")
        for key in ("engine_port", "control_port"):
            if not 0 <= getattr(self, key) <= 65535:
                raise bad(key, "a TCP port is 0..65535")
        for key in (
            "registration_timeout_s",
            "transfer_timeout_s",
            "pipeline_silence_timeout_s",
            "engine_timeout_s",
            "metadata_ttl_s",
            "pool_lookup_timeout_s",
        ):
            if not getattr(self, key) > 0:
                raise bad(key, "must be a positive number of seconds")
        if self.connections_per_peer < 1:
            raise bad("connections_per_peer", "must be >= 1")
        if self.staging_buffer_mb < 1:
            raise bad("staging_buffer_mb", "must be >= 1")
        if self.pool_buffer_mb < 1:
            raise bad("pool_buffer_mb", "must be >= 1")
        if self.pool and not self.uses_etcd:
            raise bad("pool", "the pool's store nodes are found in etcd: set metadata_server "
                      "to etcd://HOST:PORT")
        if self.advertise_url and not self.advertise_url.startswith(("http://", "https://")):
            raise bad("advertise_url", "expected an http:// or https:// URL")
        if not self.hostname:
            raise bad("hostname", "must not be empty")
        why = self.reachability_refusal()
        if why is not None:
            raise ConfigError(why)
        if self.cluster_token is not None and len(self.cluster_token) < MIN_TOKEN_CHARS:
            raise ConfigError(f"cluster_token: too short (at least {MIN_TOKEN_CHARS} "
                              "characters; use e.g. "
                              "`openssl rand -hex 32`)")

    def reachability_refusal(self) -> str | None:
        """Why peers, or the conductor, could not use the addresses this instance publishes
        (its engine and control channel at `hostname`, its HTTP server at `advertise_url`);
        None when they can. Refused at start rather than found by users as a silent
        fallback."""
        from urllib.parse import urlsplit

        url_host = urlsplit(self.advertise_url).hostname or ""
        for key, host in (("hostname", self.hostname), ("advertise_url", url_host)):
            if host and is_wildcard_host(host):
                return (f"{key}={getattr(self, key)!r}: a wildcard address is what a server "
                        "binds to, not an address anyone can connect to; set it to the "
                        "address peers reach this host at (hostname also from VLLM_HOST_IP)")
        if not self.uses_etcd:
            return None
        if not self.advertise_url:
            return (f"advertise_url is not set, with metadata_server={self.metadata_server!r}: "
                    "the conductor finds this instance by the URL it publishes, and the port "
                    "vLLM serves on is not known here; set advertise_url=http://HOST:PORT")
        from mooncake_vllm.metadata.url import parse_metadata_url

        etcd_hosts = [e.host for e in parse_metadata_url(self.metadata_server).endpoints]
        if all(is_loopback_host(h) for h in etcd_hosts):
            return None  # one host: loopback addresses are reachable by all
        for key, host in (("hostname", self.hostname), ("advertise_url", url_host)):
            if is_loopback_host(host):
                return (f"{key}={getattr(self, key)!r} is a loopback address, but etcd "
                        f"({self.metadata_server}) is not on this host: instances and "
                        "conductors elsewhere would find this address there and could not "
                        "reach it; set it to an address they reach")
        return None

    def http_url(self, default_port: int = 8000) -> str:
        """The URL the proxy should use for this instance."""
        return self.advertise_url or f"http://{self.hostname}:{default_port}"


_BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
               "0": False, "false": False, "no": False, "off": False}


def _coerce(key: str, raw: Any, source: str) -> Any:
    target = {f.name: f.type for f in dataclasses.fields(ConnectorConfig)}[key]
    where = f"{source}: {key}={raw!r}"
    try:
        if target == "bool":
            if isinstance(raw, bool):
                return raw
            word = str(raw).strip().lower()
            if word not in _BOOL_WORDS:
                raise ValueError("expected true/false")
            return _BOOL_WORDS[word]
        if target == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError("expected an integer")
            return int(raw)
        if target == "float":
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            return float(raw)
        if target == "str | None":
            return None if raw is None else str(raw)
        if target == "tuple[str, ...] | None":
            if raw is None:
                return None
            items = raw.split(",") if isinstance(raw, str) else list(raw)
            return tuple(str(i).strip() for i in items if str(i).strip())
        if not isinstance(raw, str | int | float):
            raise ValueError("expected a string")
        return str(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e
