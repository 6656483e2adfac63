"""Embedded (p2p) metadata: no store at all, for a single prefill/decode pair or the demo.

What it does:
- `publish_segment` / `register_instance` record our own segment and instance in this process
  only; nobody else can see them through this object.
- `get_segment` answers for our own segments and for descriptors a peer handed us out of band:
  the connector carries a decode worker's descriptor inside its registration message on the
  control channel (pyzmq) and calls `learn_segment(name, descriptor)` on the receiving side.
- `list_instances` returns what was registered here: our own, the `instances` given at
  construction (a static topology), and peers the caller learned about and registered.
- `register_store` / `list_stores`: store nodes of this process only (a store running inside
  an instance's process, for a one-box set-up).
- `watch_instances` callbacks fire for those local changes, synchronously.

What it does not do: discovery across processes, leases, or noticing that a peer died. The
peers' own control channel (deadlines, failed transfers) is what reveals a dead peer there, and
the proxy is configured with static URLs instead of discovering instances.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from .base import InstanceInfo, MetadataError, MetadataStore, encode_segment
from .keys import check_namespace
from .store_record import StoreInfo


class EmbeddedMetadata(MetadataStore):
    def __init__(self, namespace: str = "default",
                 instances: Iterable[InstanceInfo] = ()) -> None:
        super().__init__(check_namespace(namespace))
        self._lock = threading.Lock()
        self._own_segments: dict[str, dict[str, Any]] = {}
        self._instances: dict[str, InstanceInfo] = {i.instance_id: i for i in instances}
        self._stores: dict[str, StoreInfo] = {}
        self._closed = False

    def publish_segment(self, name: str, descriptor: dict[str, Any]) -> None:
        encode_segment(name, descriptor)  # the same validation as the etcd store
        with self._lock:
            self._check_open()
            self._own_segments[name] = descriptor

    def unpublish_segment(self, name: str) -> None:
        with self._lock:
            self._own_segments.pop(name, None)

    def get_segment(self, name: str) -> dict[str, Any] | None:
        desc = self._own_segments.get(name)
        return desc if desc is not None else self._learned.get(name)

    def register_instance(self, info: InstanceInfo) -> None:
        with self._dispatch_lock:
            with self._lock:
                self._check_open()
                old = self._instances.get(info.instance_id)
                self._instances[info.instance_id] = info
            if old != info:
                self._dispatch([("put", info)])

    def deregister_instance(self, instance_id: str) -> None:
        with self._dispatch_lock:
            with self._lock:
                old = self._instances.pop(instance_id, None)
            if old is not None:
                self._dispatch([("delete", old)])

    def get_instance(self, instance_id: str) -> InstanceInfo | None:
        return self._instances.get(instance_id)

    def list_instances(self, role: str | None = None) -> list[InstanceInfo]:
        with self._lock:
            snapshot = list(self._instances.values())
        return sorted((i for i in snapshot if i.serves(role)), key=lambda i: i.instance_id)

    def register_store(self, info: StoreInfo) -> None:
        with self._lock:
            self._check_open()
            self._stores[info.name] = info

    def deregister_store(self, name: str) -> None:
        with self._lock:
            self._stores.pop(name, None)

    def list_stores(self) -> list[StoreInfo]:
        with self._lock:
            return sorted(self._stores.values(), key=lambda s: s.name)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stores.clear()
            self._own_segments.clear()
            self._learned.clear()
            self._instances.clear()

    def _check_open(self) -> None:
        if self._closed:
            raise MetadataError("metadata store is closed")
