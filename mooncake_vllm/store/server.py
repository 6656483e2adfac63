"""One store node as a running service: a Pool whose DRAM is registered with the transfer
engine (peers READ and WRITE it one-sided), the StoreNode answering on a control channel, a
record in the metadata store (membership by its lease), and a small HTTP face (`/status`,
`/metrics`, `/health`).

Failure rules are those of node.py and pool.py; here only: a node that cannot register with
etcd or bind its ports fails at start with the reason, and while etcd is away it keeps serving
the clients that know it (the metadata layer re-puts its record when etcd is back).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from mooncake_vllm.channel.control_channel import ControlChannel
from mooncake_vllm.engine import TransferEngine
from mooncake_vllm.metadata import MetadataStore, StoreInfo
from mooncake_vllm.store import messages as m
from mooncake_vllm.store.node import StoreNode
from mooncake_vllm.store.placement import HotSpots
from mooncake_vllm.store.pool import Pool

log = logging.getLogger("mooncake_vllm.store")


@dataclass(frozen=True)
class StoreSettings:
    name: str
    hostname: str = "127.0.0.1"
    slot_bytes: int = 1 << 20
    dram_bytes: int = 1 << 30
    ssd_path: Path | None = None
    ssd_bytes: int = 0
    control_port: int = 0
    engine_port: int = 0
    status_port: int = 0  # 0: any free port; -1: no HTTP face
    cluster_token: str | None = None
    engine_timeout_s: float = 30.0
    hot_reads: int = 16
    max_replicas: int = 3
    hot_window_s: float = 10.0

    def __post_init__(self) -> None:
        if self.dram_bytes < self.slot_bytes:
            raise ValueError(f"dram_bytes {self.dram_bytes} holds no slot of {self.slot_bytes}")
        if self.ssd_bytes and self.ssd_path is None:
            raise ValueError("an SSD tier (ssd_bytes) needs ssd_path")


class StoreServer:
    def __init__(self, settings: StoreSettings, metadata: MetadataStore) -> None:
        s = self.settings = settings
        self.metadata = metadata
        # The HTTP port first: a fixed one must not be taken by the engine's or the channel's
        # ephemeral ports below. It answers once the node is built (serve_forever, at the end).
        self.http: ThreadingHTTPServer | None = None
        status_url = ""
        if s.status_port >= 0:
            self.http = ThreadingHTTPServer((s.hostname, s.status_port), _handler(self))
            status_url = f"http://{_url_host(s.hostname)}:{self.http.server_address[1]}"
        self.pool = Pool(s.slot_bytes, s.dram_bytes // s.slot_bytes, s.ssd_path,
                         s.ssd_bytes // s.slot_bytes)
        self.engine = TransferEngine(s.hostname, "auto", s.engine_port, s.cluster_token,
                                     s.engine_timeout_s)
        # Clients read the pool's slots one-sided: the only region anywhere that allows READ.
        self.engine.register(self.pool.base, self.pool.nbytes, remote_read=True)
        # A posted write can land up to the engine's timeout late, and the kernel may still
        # hold its bytes for about as long again (TCP_USER_TIMEOUT): the node waits both.
        self.node = StoreNode(self.pool, self._send, landing_s=2 * s.engine_timeout_s + 5,
                              hot=HotSpots(s.hot_reads, s.max_replicas, s.hot_window_s))
        self.channel = ControlChannel(s.hostname, s.control_port, self.node.on_message,
                                      self.node.tick, codec=m.CODEC, tick_s=0.5,
                                      token=s.cluster_token)
        self.info = StoreInfo(s.name, self.channel.endpoint, self.engine.name,
                              self.pool.slot_bytes, self.pool.dram_slots, self.pool.ssd_slots,
                              status_url)
        metadata.publish_segment(self.engine.name, self.engine.descriptor())
        metadata.register_store(self.info)
        if self.http is not None:
            threading.Thread(target=self.http.serve_forever, name="mooncake-store-http",
                             daemon=True).start()
        log.info("store %s: %d DRAM slots and %d SSD slots of %d bytes; channel %s, engine %s, "
                 "status %s", s.name, self.pool.dram_slots, self.pool.ssd_slots,
                 self.pool.slot_bytes, self.channel.endpoint, self.engine.name,
                 status_url or "off")

    def _send(self, to: bytes, msg: m.Message) -> None:
        self.channel.send(to, msg)

    def status(self) -> dict[str, Any]:
        return {"name": self.settings.name, "tiers": self.pool.occupancy(),
                "slot_bytes": self.pool.slot_bytes, "pool": dict(self.pool.stats),
                "node": dict(self.node.stats), "open": self.node.open_count(),
                "engine": self.engine.stats(), "channel": self.channel.endpoint}

    def metrics(self) -> str:
        st = self.status()
        lines = []
        for tier, occ in st["tiers"].items():
            for what, n in occ.items():
                lines.append(f'mooncake_store_slots{{tier="{tier}",state="{what}"}} {n}')
        for group in ("pool", "node"):
            for what, n in st[group].items():
                lines.append(f"mooncake_store_{what}_total {n}")
        engine = st["engine"]
        for what in ("bytes_sent", "bytes_received"):
            if what in engine:
                lines.append(f"mooncake_store_engine_{what}_total {engine[what]}")
        return "\n".join(lines) + "\n"

    def close(self) -> None:
        try:
            self.metadata.deregister_store(self.settings.name)
            self.metadata.unpublish_segment(self.engine.name)
        except Exception as e:  # etcd away: the lease takes the record within its TTL
            log.warning("store %s: could not withdraw its record: %s", self.settings.name, e)
        if self.http is not None:
            self.http.shutdown()
            self.http.server_close()
        self.channel.close()
        self.engine.unregister(self.pool.base)
        self.engine.close()
        self.pool.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _handler(server: StoreServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path == "/status":
                body, kind = json.dumps(server.status()).encode(), "application/json"
            elif self.path == "/metrics":
                body, kind = server.metrics().encode(), "text/plain; version=0.0.4"
            elif self.path == "/health":
                body, kind = b"ok\n", "text/plain"
            else:
                self.send_error(404, "try /status, /metrics or /health")
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug("http: " + fmt, *args)

    return Handler


def default_name() -> str:
    return socket.gethostname()
