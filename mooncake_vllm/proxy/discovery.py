"""Where instances come from: static URL lists, or the metadata store (etcd) with a watch.

With discovery a new instance takes traffic as soon as its record appears, and one whose record
vanishes (deregistered, or its lease expired because it died) is removed at once. The store's
callbacks run on its own thread; they hop onto the event loop, which alone touches the registry.

Every record is checked before it is used (validation.py): a record whose `http_url` or
`remote_control` is not what an instance writes is skipped with a warning naming the field,
and an instance already known under that id is dropped, so the store cannot point the
conductor at arbitrary addresses.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from mooncake_vllm.remote_control import endpoint_problem, remote_control_problem

from .pool_view import identity_of
from .upstreams import Registry
from .validation import http_url_problem

log = logging.getLogger(__name__)


def static_id(role: str, url: str) -> str:
    u = urlparse(url)
    return f"{role}@{u.hostname}:{u.port}"


def add_static(registry: Registry, role: str, urls: tuple[str, ...]) -> None:
    for url in urls:
        registry.upsert(static_id(role, url), url, role, "static")


def record_problem(info: Any) -> str | None:
    """Why an instance record must not be used (naming the field), or None."""
    problem = http_url_problem(info.http_url)
    if problem:
        return f"http_url {info.http_url!r:.120}: {problem}"
    events = (info.extra or {}).get("kv_events")
    if events:
        problem = endpoint_problem(events)
        if problem:
            return f"extra.kv_events {events!r:.120}: {problem}"
    try:
        identity_of(info.extra)
    except ValueError as e:
        return str(e)
    if info.remote_control:  # empty: learned later from a probe of the instance itself
        problem = remote_control_problem(info.remote_control)
        if problem:
            return f"remote_control: {problem}"
    return None


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
        problem = record_problem(info)
        if problem:
            log.warning("instance %s: record skipped, %s", info.instance_id, problem)
            # A record that turned bad must not leave its earlier, valid form routable.
            self.registry.remove(info.instance_id)
            return
        self.registry.upsert(info.instance_id, info.http_url, info.role, "discovery",
                             model=info.model, remote_control=info.remote_control or None,
                             model_shape=getattr(info, "model_shape", None),
                             kv_events=str((info.extra or {}).get("kv_events", "")),
                             pool_identity=identity_of(info.extra))

    @property
    def store(self) -> Any:
        """The open metadata store (None before start): the pool view reads its members."""
        return self._store

    def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._store is not None:
            self._store.close()
