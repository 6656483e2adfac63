"""Where instances come from: static URL lists, or the metadata store (etcd) with a watch.

With discovery a new instance takes traffic as soon as its record appears, and one whose record
vanishes (deregistered, or its lease expired because it died) is removed at once. The store's
callbacks run on its own thread; they hop onto the event loop, which alone touches the registry.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from .upstreams import Registry

log = logging.getLogger(__name__)


def static_id(role: str, url: str) -> str:
    u = urlparse(url)
    return f"{role}@{u.hostname}:{u.port}"


def add_static(registry: Registry, role: str, urls: tuple[str, ...]) -> None:
    for url in urls:
        registry.upsert(static_id(role, url), url, role, "static")


class Discovery:
    """Mirror the metadata store's instance records into the registry."""

    def __init__(self, registry: Registry, metadata_url: str, namespace: str) -> None:
        self.registry = registry
        self.metadata_url = metadata_url
        self.namespace = namespace
        self._store: Any = None
        self._unsubscribe: Callable[[], None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        from mooncake_vllm.metadata import open_metadata

        self._store = open_metadata(self.metadata_url, namespace=self.namespace)

        def on_event(event: str, info: Any) -> None:  # store thread
            loop.call_soon_threadsafe(self._apply, event, info)

        self._unsubscribe = self._store.watch_instances(on_event)

    def _apply(self, event: str, info: Any) -> None:
        if event == "delete":
            self.registry.remove(info.instance_id)
            return
        if not info.http_url:
            log.warning("instance %s has no http_url: not routable", info.instance_id)
            return
        self.registry.upsert(info.instance_id, info.http_url, info.role, "discovery",
                             model=info.model, remote_control=info.remote_control or None)

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._store is not None:
            self._store.close()
