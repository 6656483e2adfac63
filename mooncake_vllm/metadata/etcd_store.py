"""Metadata on etcd (v3 API): a leased registry with a watch-backed local cache.

Client library: `etcd-sdk-python` (module `pyetcd`). It is the etcd3 Python API with protobuf
stubs regenerated for current protobuf, so it imports beside the protobuf that vLLM pins (PyPI's
`etcd3` 0.12 does not, unless the slow pure-Python protobuf is forced); it is synchronous and
thread-based like the rest of this package (`aetcd` would force an asyncio loop into vLLM's
worker processes); and it covers leases, prefix watches from a revision, user/password auth and
TLS with client certificates. Two gaps are worked around in `etcd_client`: its multi-endpoint
client blacklists a failed member for minutes and never re-authenticates after etcd restarts,
so we connect to one endpoint at a time, in order, and make a fresh client after any failure.

How it behaves:

- Keys: `/mooncake-vllm/<namespace>/instances/<id>`, `.../segments/<name>` and
  `.../stores/<name>` (see `keys`),
  all written with one lease of `ttl_s` seconds, renewed every `ttl_s / 3` by a background
  thread. A SIGKILLed process stops renewing: etcd deletes its keys within `ttl_s` and every
  watcher sees the deletes.
- Cache: at connect the prefix is listed, then watched from the next revision, so no event
  falls between the two. Lookups read only this cache. Our own writes wait (bounded) until
  the watch has delivered them, so a reader sees what it just wrote.
- Faults: when the watch or a renewal fails (etcd down, restarted, partitioned), lookups keep
  answering from the cache while the thread reconnects with backoff (0.1 s doubling to 1 s).
  Once etcd answers it renews the old lease if etcd still has it, else grants a new one;
  re-puts every key of ours that is missing or stale; lists the prefix again and hands the
  watchers a "put"/"delete" for every difference. Writes made while offline are kept and
  written then.
- Segments outlive their key for `last_segment`: a segment whose key is deleted (its lease
  lapsed while its process was starved on a loaded host, or an operator's delete) is still
  answered from its last descriptor until a new one is put. A peer asks for a segment only
  when that segment's owner has just registered a transfer with it (sealed with the cluster
  token), which proves the owner alive; one that is really gone fails at connect, as it
  would with a fresh record. Instance records get no such grace: their deletion is how
  discovery learns of a death.
- A value under the prefix that is not one of ours (not JSON, wrong kind, newer schema,
  name/key mismatch, foreign sub-path) is skipped with one warning per distinct value.
- `close()` revokes the lease, which deletes all our keys at once.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from typing import Any

from .base import (
    InstanceEvent,
    InstanceInfo,
    MalformedValueError,
    MetadataConfigError,
    MetadataError,
    MetadataStore,
    MetadataUnavailableError,
    decode_segment,
    encode_segment,
)
from .etcd_client import (
    EtcdConnection,
    EtcdSettings,
    connect,
    describe_error,
    is_transient,
    watch_events,
)
from .keys import KeyLayout
from .store_record import StoreInfo

log = logging.getLogger(__name__)

MIN_TTL_S = 2  # etcd rounds shorter leases up to about this anyway
_BACKOFF_START_S = 0.1
_BACKOFF_MAX_S = 1.0
MAX_DEPARTED_SEGMENTS = 1024  # last descriptors kept of deleted segment keys

Change = tuple[InstanceEvent, InstanceInfo]


class _ConnectionLost(Exception):
    pass


class EtcdMetadata(MetadataStore):
    """See the module docstring. Raises `MetadataUnavailableError` if etcd cannot be used."""

    def __init__(self, settings: EtcdSettings, *, namespace: str = "default",
                 ttl_s: float = 10.0) -> None:
        super().__init__(namespace)
        if not ttl_s >= MIN_TTL_S:
            raise MetadataConfigError(f"ttl_s must be at least {MIN_TTL_S} s, got {ttl_s!r}")
        self._settings = settings
        self._keys = KeyLayout(namespace)
        self.ttl_s = int(math.ceil(ttl_s))  # etcd leases have whole seconds

        # The cache: replaced or updated by the session thread only; read lock-free.
        self._cache_cond = threading.Condition()  # guards _revision, signals its progress
        self._instances: dict[str, InstanceInfo] = {}
        self._segments: dict[str, dict[str, Any]] = {}
        self._stores: dict[str, StoreInfo] = {}
        # Last descriptors of segments whose keys were deleted (see the module docstring).
        self._departed: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._revision = 0
        self._warned: dict[str, bytes] = {}  # key -> the bad value we already warned about

        # Our writes. _write_lock is held across the etcd calls that write our keys, so a
        # re-put after reconnect cannot interleave with a user's deregister.
        self._write_lock = threading.Lock()
        self._own: dict[str, bytes] = {}
        self._to_delete: set[str] = set()
        self._conn: EtcdConnection | None = None
        self._lease_id = 0
        self._generation = 0  # bumped per connection; stale watch callbacks are dropped
        self._closed = False

        self._inbox: queue.Queue[tuple[int, Any] | None] = queue.Queue()
        self._stop = threading.Event()
        self._online = threading.Event()
        try:  # the first connection is synchronous: fail loudly at start
            self._establish()
        except MetadataError:
            raise
        except Exception as e:  # reachable, but the lease/list/watch set-up was refused
            raise MetadataUnavailableError(
                f"etcd at {settings.endpoint_list}: setting up namespace {namespace!r} failed "
                f"({describe_error(e)}); check the user's permissions on {self._keys.prefix}"
            ) from e
        self._thread = threading.Thread(
            target=self._run, name=f"mooncake-etcd-{namespace}", daemon=True
        )
        self._thread.start()

    # ----------------------------------------------------------------- public API
    @property
    def online(self) -> bool:
        """True while connected to etcd with a live lease and watch."""
        return self._online.is_set()

    @property
    def lease_id(self) -> int:
        return self._lease_id

    @property
    def endpoint(self) -> str | None:
        conn = self._conn
        return str(conn.endpoint) if conn is not None else None

    def publish_segment(self, name: str, descriptor: dict[str, Any]) -> None:
        self._write(self._keys.segment_key(name), encode_segment(name, descriptor))

    def unpublish_segment(self, name: str) -> None:
        self._remove(self._keys.segment_key(name))

    def get_segment(self, name: str) -> dict[str, Any] | None:
        """The descriptor (shared with the cache: do not mutate it), or None."""
        desc = self._segments.get(name)
        return desc if desc is not None else self._learned.get(name)

    def last_segment(self, name: str) -> dict[str, Any] | None:
        desc = self.get_segment(name)
        return desc if desc is not None else self._departed.get(name)

    def register_instance(self, info: InstanceInfo) -> None:
        self._write(self._keys.instance_key(info.instance_id), info.to_json())

    def deregister_instance(self, instance_id: str) -> None:
        self._remove(self._keys.instance_key(instance_id))

    def get_instance(self, instance_id: str) -> InstanceInfo | None:
        return self._instances.get(instance_id)

    def list_instances(self, role: str | None = None) -> list[InstanceInfo]:
        snapshot = list(self._instances.values())
        return sorted((i for i in snapshot if i.serves(role)), key=lambda i: i.instance_id)

    def register_store(self, info: StoreInfo) -> None:
        self._write(self._keys.store_key(info.name), info.to_json())

    def deregister_store(self, name: str) -> None:
        self._remove(self._keys.store_key(name))

    def list_stores(self) -> list[StoreInfo]:
        return sorted(self._stores.values(), key=lambda s: s.name)

    def wait_online(self, timeout_s: float) -> bool:
        return self._online.wait(timeout_s)

    def close(self) -> None:
        with self._write_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._inbox.put(None)
        if threading.current_thread() is not self._thread:  # close() from a watch callback
            self._thread.join(timeout=4 * self._settings.timeout_s + 2)
        with self._write_lock:
            conn, self._conn = self._conn, None
            lease, self._own = self._lease_id, {}
        self._online.clear()
        if conn is None:
            log.warning("closing while etcd is unreachable: our keys expire within %d s",
                        self.ttl_s)
            return
        try:
            conn.revoke(lease)  # deletes every key of ours in one step
        except Exception as e:
            log.warning("could not revoke lease %x on %s (%s): our keys expire within %d s",
                        lease, conn.endpoint, describe_error(e), self.ttl_s)
        finally:
            conn.close()

    # ----------------------------------------------------------------- writes
    def _write(self, key: str, value: bytes) -> None:
        with self._write_lock:
            if self._closed:
                raise MetadataError("metadata store is closed")
            self._own[key] = value
            self._to_delete.discard(key)
            revision = self._send(lambda c: c.put(key, value, self._lease_id), key)
        self._wait_revision(revision)

    def _remove(self, key: str) -> None:
        with self._write_lock:
            if self._own.pop(key, None) is None:
                log.warning("not removing %s: this process did not write it", key)
                return
            self._to_delete.add(key)
            revision = self._send(lambda c: c.delete(key), key)
            if revision:
                self._to_delete.discard(key)
        self._wait_revision(revision)

    def _send(self, op: Any, key: str) -> int:
        """Run `op(conn)` if connected; on failure leave it to the reconnect. Holds _write_lock."""
        conn = self._conn
        if conn is None:
            log.info("etcd unreachable: %s will be written when it is back", key)
            return 0
        try:
            return int(op(conn))
        except Exception as e:
            if not is_transient(e):  # e.g. permission denied: retrying cannot help
                self._own.pop(key, None)
                self._to_delete.discard(key)
                raise MetadataError(f"etcd refused the write of {key}: {describe_error(e)}"
                                    ) from e
            log.warning("etcd write of %s failed (%s); it will be redone on reconnect",
                        key, describe_error(e))
            self._inbox.put((self._generation, e))
            return 0

    def _wait_revision(self, revision: int) -> None:
        """Read-your-writes: wait (bounded) until the watch has applied `revision`."""
        if not revision:
            return
        with self._cache_cond:
            self._cache_cond.wait_for(
                lambda: self._revision >= revision or not self._online.is_set(),
                timeout=self._settings.timeout_s,
            )

    # ----------------------------------------------------------------- session
    def _establish(self) -> None:
        """Connect, keep or re-grant the lease, re-put our keys, resync the cache, watch."""
        conn = connect(self._settings, self._keys.prefix)
        try:
            lease_id = self._lease_id
            if not lease_id or conn.keepalive(lease_id) <= 0:
                lease_id = conn.grant(self.ttl_s)
            with self._write_lock:
                if self._closed:
                    conn.close()
                    return
                for key in sorted(self._to_delete):
                    conn.delete(key)
                self._to_delete.clear()
                _, existing = conn.list_prefix(self._keys.prefix)
                present = {k: (v, lease) for k, v, lease in existing}
                stale = [k for k, v in self._own.items() if present.get(k) != (v, lease_id)]
                for key in stale:
                    conn.put(key, self._own[key], lease_id)
                self._generation += 1
                generation = self._generation
                self._conn, self._lease_id = conn, lease_id
            revision, kvs = conn.list_prefix(self._keys.prefix)
            self._resync(revision, kvs)
            conn.watch_prefix(self._keys.prefix, revision + 1,
                              lambda resp: self._inbox.put((generation, resp)))
        except BaseException:
            with self._write_lock:
                if self._conn is conn:
                    self._conn = None
            conn.close()
            raise
        self._online.set()
        if stale:
            log.info("etcd %s: re-put %d key(s) of ours under lease %x",
                     conn.endpoint, len(stale), lease_id)

    def _run(self) -> None:
        interval = self.ttl_s / 3.0
        next_renewal = time.monotonic() + interval
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_renewal:
                    self._renew()
                    next_renewal = time.monotonic() + interval
                    continue
                try:
                    item = self._inbox.get(timeout=max(0.0, next_renewal - time.monotonic()))
                except queue.Empty:
                    continue
                if item is None or item[0] != self._generation:
                    continue  # a wake-up, or a leftover of an older connection
                payload = item[1]
                if payload is None or isinstance(payload, BaseException):
                    raise _ConnectionLost(
                        "watch ended" if payload is None else describe_error(payload))
                self._apply_watch(payload)
            except Exception as e:
                if self._stop.is_set():
                    break
                self._recover(e)
                next_renewal = time.monotonic() + interval

    def _renew(self) -> None:
        conn = self._conn
        if conn is None:
            raise _ConnectionLost("not connected")
        if conn.keepalive(self._lease_id) <= 0:
            raise _ConnectionLost(f"lease {self._lease_id:x} expired")

    def _recover(self, cause: Exception) -> None:
        self._online.clear()
        with self._write_lock:
            conn, self._conn = self._conn, None
            self._generation += 1
        where = conn.endpoint if conn is not None else self._settings.endpoint_list
        log.warning("etcd %s lost (%s): serving lookups from cache, reconnecting",
                    where, describe_error(cause))
        if conn is not None:
            conn.close()
        with self._cache_cond:
            self._cache_cond.notify_all()  # release writers waiting for their revision
        delay, attempts, started = _BACKOFF_START_S, 0, time.monotonic()
        while not self._stop.is_set():
            attempts += 1
            try:
                self._establish()
                log.warning("etcd reconnected to %s after %.1f s (%d attempt(s)), lease %x",
                            self.endpoint, time.monotonic() - started, attempts, self._lease_id)
                return
            except Exception as e:
                (log.warning if attempts == 1 else log.debug)(
                    "etcd reconnect attempt %d failed: %s", attempts, describe_error(e))
            self._stop.wait(delay)
            delay = min(delay * 2, _BACKOFF_MAX_S)

    # ----------------------------------------------------------------- cache
    def _resync(self, revision: int, kvs: list[tuple[str, bytes, int]]) -> None:
        """Replace the cache by a full listing; watchers get the difference."""
        instances: dict[str, InstanceInfo] = {}
        segments: dict[str, dict[str, Any]] = {}
        stores: dict[str, StoreInfo] = {}
        for key, value, _lease in kvs:
            record = self._decode(key, value)
            if isinstance(record, InstanceInfo):
                instances[record.instance_id] = record
            elif isinstance(record, StoreInfo):
                stores[record.name] = record
            elif record is not None:
                segments[record[0]] = record[1]
        with self._dispatch_lock:
            old = self._instances
            changes: list[Change] = [("delete", i) for k, i in old.items() if k not in instances]
            changes += [("put", i) for k, i in instances.items() if old.get(k) != i]
            with self._cache_cond:
                self._keep_departed(segments)
                self._instances, self._segments = instances, segments
                self._stores = stores
                self._revision = max(self._revision, revision)
                self._cache_cond.notify_all()
            self._dispatch(changes)

    def _keep_departed(self, segments: dict[str, dict[str, Any]]) -> None:
        """Before the cache becomes `segments`: remember the descriptors it loses (bounded)."""
        for name, desc in self._segments.items():
            if name not in segments:
                self._departed[name] = desc
                self._departed.move_to_end(name)
        for name in segments:
            self._departed.pop(name, None)
        while len(self._departed) > MAX_DEPARTED_SEGMENTS:
            self._departed.popitem(last=False)

    def _apply_watch(self, response: Any) -> None:
        with self._dispatch_lock:
            changes: list[Change] = []
            instances, segments = dict(self._instances), dict(self._segments)
            stores = dict(self._stores)
            for event, key, value in watch_events(response):
                record = self._decode(key, value) if event == "put" else None
                parsed = self._keys.parse(key)
                if parsed is None:
                    continue
                kind, name = parsed
                if kind == "store":
                    if isinstance(record, StoreInfo):
                        stores[name] = record
                    else:
                        stores.pop(name, None)
                    continue
                if kind == "segment":
                    if isinstance(record, tuple):
                        segments[name] = record[1]
                    else:
                        segments.pop(name, None)
                    continue
                old = instances.get(name)
                if isinstance(record, InstanceInfo):
                    instances[name] = record
                    if old != record:
                        changes.append(("put", record))
                elif old is not None:  # deleted, or overwritten with something unusable
                    del instances[name]
                    changes.append(("delete", old))
            with self._cache_cond:
                self._keep_departed(segments)
                # Copy-on-write: lock-free readers always see a complete dict.
                self._instances, self._segments = instances, segments
                self._stores = stores
                self._revision = max(self._revision, int(response.header.revision))
                self._cache_cond.notify_all()
            self._dispatch(changes)

    def _decode(self, key: str, value: bytes
                ) -> InstanceInfo | StoreInfo | tuple[str, dict[str, Any]] | None:
        """The record under `key`, or None (with one warning per bad value) if unusable."""
        parsed = self._keys.parse(key)
        try:
            if parsed is None:
                raise MalformedValueError("not an instances/, segments/ or stores/ key")
            kind, name = parsed
            if kind == "store":
                store = StoreInfo.from_json(value)
                if store.name != name:
                    raise MalformedValueError(f"store name {store.name!r} != key")
                return store
            if kind == "instance":
                info = InstanceInfo.from_json(value)
                if info.instance_id != name:
                    raise MalformedValueError(f"instance_id {info.instance_id!r} != key")
                return info
            seg_name, desc = decode_segment(value)
            if seg_name != name:
                raise MalformedValueError(f"segment name {seg_name!r} != key")
            return seg_name, desc
        except MalformedValueError as e:
            if self._warned.get(key) != value:
                self._warned[key] = value
                log.warning("skipping %s in etcd: %s (value %r)", key, e, value[:120])
            return None
