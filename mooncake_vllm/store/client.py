"""A client's side of the pool protocol: find, read and write entries on the live store nodes.

Used by a connector worker, whose engine moves the bytes: entries are read into and written
from memory the caller has registered with that engine (the worker's staging slots), one
contiguous entry per key. Stores come from the metadata layer (`list_stores`, the etcd
membership), owners by rendezvous hashing over them (placement.py): no server sits on the
data path, and every client computes the same owners.

Failure rules: every call is bounded (`ask_timeout_s` per question, the engine's timeout per
transfer) and answers with how many leading entries it found, read or wrote; a store that is
slow, full, gone or refuses is a miss for its keys, never an exception. A store that did not
answer in time is not asked again for `SILENT_S` (its keys are misses meanwhile, and owners
do not move): a dead node whose etcd record has not lapsed yet costs one wait, not one per
request. A read's pins are
released once its transfers have ended; a write whose transfer failed is not committed (the
store takes the slots back after the lease and landing bound), so no reader sees half an entry.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mooncake_vllm.channel.control_channel import ControlChannel
from mooncake_vllm.engine import TransferEngine, TransferError
from mooncake_vllm.metadata import MetadataStore, StoreInfo
from mooncake_vllm.store import messages as m
from mooncake_vllm.store.placement import owners, pick_replica

log = logging.getLogger("vllm.mooncake_vllm.store")
V = m.PROTOCOL_VERSION
SILENT_S = 5.0


@dataclass
class Found:
    held: int  # leading keys held in the pool
    copies: list[int] = field(default_factory=list)  # per key: owners that should hold it


@dataclass
class _Waiter:
    endpoint: str  # the store asked: only its reply is taken
    event: threading.Event = field(default_factory=threading.Event)
    reply: Any = None


class PoolLookup:
    """Membership and lookups only (no engine): what a conductor needs to know where blocks
    are. `count_reads`: whether the stores count these lookups as reads (hot spots); a
    conductor's do not, since the instance it routes to looks the blocks up again."""

    def __init__(self, metadata: MetadataStore, *, hostname: str, token: str | None,
                 entry_bytes: int = 1, ask_timeout_s: float = 1.0,
                 count_reads: bool = True) -> None:
        self.metadata, self.entry_bytes, self.ask_timeout_s = metadata, entry_bytes, ask_timeout_s
        self.count_reads = count_reads
        self._lock = threading.Lock()
        self._waiting: dict[str, _Waiter] = {}
        self._too_small: set[str] = set()
        # Control endpoint -> until when it is not asked (a restarted node has a new one).
        self._silent: dict[str, float] = {}
        self._endpoints: dict[str, str] = {}  # store name -> its control endpoint, as last seen
        # The default tick: a question to a store not connected yet waits for the channel
        # thread's next turn once the connection is up.
        self.channel = ControlChannel(hostname, 0, self._on_reply, lambda: None, codec=m.CODEC,
                                      token=token)

    # ------------------------------------------------------------------ membership
    def live_stores(self) -> dict[str, StoreInfo]:
        """The store nodes this client can use: alive in etcd, slots large enough."""
        stores = {}
        for info in self.metadata.list_stores():
            if info.slot_bytes < self.entry_bytes:
                if info.name not in self._too_small:
                    self._too_small.add(info.name)
                    log.warning("pool: store %s has %d-byte slots, an entry here is %d bytes: "
                                "not used (start it with --slot-bytes %d or more)", info.name,
                                info.slot_bytes, self.entry_bytes, self.entry_bytes)
                continue
            stores[info.name] = info
            self._endpoints[info.name] = info.control_endpoint
        return stores

    def _asked(self, name: str) -> bool:
        """Whether `name` is asked at all (not silent lately)."""
        endpoint = self._endpoints.get(name, "")
        until = self._silent.get(endpoint)
        if until is None:
            return True
        if time.monotonic() < until:
            return False
        self._silent.pop(endpoint, None)
        return True

    def _went_silent(self, name: str, what: str) -> None:
        endpoint = self._endpoints.get(name, "")
        if endpoint not in self._silent:
            log.warning("pool: store %s did not answer a %s within %.1fs: its keys are misses "
                        "for %.0fs", name, what, self.ask_timeout_s, SILENT_S)
        self._silent[endpoint] = time.monotonic() + SILENT_S

    # ------------------------------------------------------------------ questions
    def _on_reply(self, sender: bytes | str, msg: m.Message) -> None:
        with self._lock:
            waiter = self._waiting.get(msg.id)
        if waiter is None or sender != waiter.endpoint:
            log.debug("pool: dropped an unasked %s from %r", type(msg).__name__, sender)
            return
        waiter.reply = msg
        waiter.event.set()

    def _ask_all(self, questions: Sequence[tuple[str, m.Message]]) -> dict[str, Any]:
        """Send every (endpoint, question) at once; their replies by id (missing: none in
        time)."""
        waiters = {q.id: _Waiter(endpoint) for endpoint, q in questions}
        with self._lock:
            self._waiting.update(waiters)
        try:
            for endpoint, q in questions:
                self.channel.send(endpoint, q)
            deadline = time.monotonic() + self.ask_timeout_s
            for w in waiters.values():
                w.event.wait(max(0.0, deadline - time.monotonic()))
            return {rid: w.reply for rid, w in waiters.items() if w.reply is not None}
        finally:
            with self._lock:
                for rid in waiters:
                    self._waiting.pop(rid, None)

    # ------------------------------------------------------------------ lookup
    def lookup(self, keys: Sequence[bytes]) -> Found:
        """How many leading `keys` the pool holds: one batched Lookup per primary owner."""
        stores = self.live_stores()
        if not keys or not stores:
            return Found(0, [1] * len(keys))
        names = sorted(stores)
        by_owner: dict[str, list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            by_owner[owners(key, names, 1)[0]].append(i)
        asked = {name: m.Lookup(V, uuid.uuid4().hex, [keys[i] for i in idx], self.count_reads)
                 for name, idx in by_owner.items() if self._asked(name)}
        replies = self._ask_all([(stores[n].control_endpoint, q) for n, q in asked.items()])
        held, copies = len(keys), [1] * len(keys)
        for name, idx in by_owner.items():
            reply = replies.get(asked[name].id) if name in asked else None
            if not isinstance(reply, m.Located):
                if name in asked:
                    self._went_silent(name, "lookup")
                held = min(held, idx[0])
                continue
            if reply.held < len(idx):
                held = min(held, idx[reply.held])
            for i, c in zip(idx, reply.copies, strict=False):
                copies[i] = c
        return Found(held, copies)

    def close(self) -> None:
        self.channel.close()


class PoolClient(PoolLookup):
    """Lookups, and reads and writes of entries through the caller's engine."""

    def __init__(self, engine: TransferEngine, metadata: MetadataStore, *, hostname: str,
                 token: str | None, reader: str, entry_bytes: int,
                 ask_timeout_s: float = 1.0, lease_s: float = 10.0) -> None:
        super().__init__(metadata, hostname=hostname, token=token, entry_bytes=entry_bytes,
                         ask_timeout_s=ask_timeout_s)
        self.engine, self.reader, self.lease_s = engine, reader, lease_s
        self._segments: dict[str, int] = {}

    # ------------------------------------------------------------------ reads
    def read(self, keys: Sequence[bytes], addresses: Sequence[int],
             copies: Sequence[int] | None = None) -> int:
        """Read the entries of `keys` into `addresses` (entry_bytes each, registered with the
        engine); how many leading ones landed."""
        stores = self.live_stores()
        if not keys or not stores:
            return 0
        names = sorted(stores)
        copies = list(copies) if copies is not None else [1] * len(keys)
        source: dict[int, str] = {}
        for i, key in enumerate(keys):
            cands = owners(key, names, max(1, copies[i]))
            source[i] = pick_replica(key, cands, self.reader) if len(cands) > 1 else cands[0]
        landed = self._read_rounds(stores, keys, addresses, source)
        # Keys whose replica was not there yet: from their primary owner.
        retry = {i: owners(keys[i], names, 1)[0] for i in range(len(keys))
                 if i not in landed and source[i] != owners(keys[i], names, 1)[0]}
        if retry:
            landed |= self._read_rounds(stores, keys, addresses, retry)
        n = 0
        while n in landed:
            n += 1
        return n

    def _read_rounds(self, stores: dict[str, StoreInfo], keys: Sequence[bytes],
                     addresses: Sequence[int], source: dict[int, str]) -> set[int]:
        """Rounds of `_read_round`: a store that pinned fewer than asked (an SSD-heavy node
        has few DRAM slots to read entries back into) is asked for the rest once the round's
        pins are released, while each round makes progress."""
        landed: set[int] = set()
        while source:
            got = self._read_round(stores, keys, addresses, source)
            if not got:
                break
            landed |= got
            progressed = {source[j] for j in got}
            source = {i: n for i, n in source.items() if i not in landed and n in progressed}
        return landed

    def _read_round(self, stores: dict[str, StoreInfo], keys: Sequence[bytes],
                    addresses: Sequence[int], source: dict[int, str]) -> set[int]:
        by_store: dict[str, list[int]] = defaultdict(list)
        for i in sorted(source):
            by_store[source[i]].append(i)
        pins = {name: m.Pin(V, uuid.uuid4().hex, [keys[i] for i in idx], self.lease_s)
                for name, idx in by_store.items() if self._asked(name)}
        replies = self._ask_all([(stores[n].control_endpoint, q) for n, q in pins.items()])
        landed: set[int] = set()
        batches = []
        for name, idx in by_store.items():
            if name not in pins:
                continue
            reply = replies.get(pins[name].id)
            if reply is None:
                self._went_silent(name, "read")
            if not isinstance(reply, m.Pinned) or not reply.addresses:
                continue
            got = idx[:len(reply.addresses)]  # a store answering more than asked: cut
            batch = self._submit(stores[name], "read", [addresses[i] for i in got],
                                 reply.addresses[:len(got)])
            batches.append((name, pins[name].id, got, batch))
        for name, pin_id, got, batch in batches:
            if batch is not None and self._finish(stores[name], batch):
                landed.update(got)
            # Released only once the transfer has ended: eviction must not overwrite a slot
            # that is still being read.
            self.channel.send(stores[name].control_endpoint, m.Unpin(V, pin_id))
        # Pins a store granted after we stopped waiting are released by its lease.
        return landed

    # ------------------------------------------------------------------ writes
    def write(self, keys: Sequence[bytes], addresses: Sequence[int],
              copies: Sequence[int] | None = None) -> int:
        """Store the entries at `addresses` under `keys` on their owners (and on the next
        owners where `copies` asks for replicas); how many entries were written (keys a
        store already held count as done)."""
        stores = self.live_stores()
        if not keys or not stores:
            return 0
        names = sorted(stores)
        copies = list(copies) if copies is not None else [1] * len(keys)
        targets: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for i, key in enumerate(keys):
            for rank, name in enumerate(owners(key, names, max(1, copies[i]))):
                targets[(name, rank > 0)].append(i)
        written = 0
        # A store with few free DRAM slots (an SSD-heavy one) reserves fewer than asked: what
        # it took is written and committed (then free to move to SSD), and the rest asked
        # again, while each round makes progress.
        while targets:
            done, targets = self._write_round(stores, keys, addresses, targets)
            written += done
            if not done:
                break
        return written

    def _write_round(self, stores: dict[str, StoreInfo], keys: Sequence[bytes],
                     addresses: Sequence[int], targets: dict[tuple[str, bool], list[int]]
                     ) -> tuple[int, dict[tuple[str, bool], list[int]]]:
        """One Reserve per target, the writes, the commits; (entries written, what is left
        to ask again)."""
        asks = {t: m.Reserve(V, uuid.uuid4().hex, [keys[i] for i in idx], self.lease_s,
                             replica=t[1]) for t, idx in targets.items() if self._asked(t[0])}
        replies = self._ask_all([(stores[t[0]].control_endpoint, q) for t, q in asks.items()])
        written, pending, left = 0, [], {}
        for t, idx in targets.items():
            if t not in asks:
                continue
            reply = replies.get(asks[t].id)
            if reply is None:
                self._went_silent(t[0], "reservation")
            if not isinstance(reply, m.Reserved):
                continue
            if reply.reason:
                log.debug("pool: store %s reserved %d of %d: %s", t[0], len(reply.addresses),
                          len(idx), reply.reason)
                if reply.addresses:
                    left[t] = idx[len(reply.addresses):]
            pairs = [(addresses[i], a) for i, a in zip(idx, reply.addresses, strict=False) if a]
            if not pairs:
                self.channel.send(stores[t[0]].control_endpoint, m.Commit(V, asks[t].id))
                continue
            batch = self._submit(stores[t[0]], "write", [p[0] for p in pairs],
                                 [p[1] for p in pairs])
            pending.append((t, len(pairs), batch))
        for t, count, batch in pending:
            if batch is not None and self._finish(stores[t[0]], batch):
                self.channel.send(stores[t[0]].control_endpoint, m.Commit(V, asks[t].id))
                written += count
            else:
                left.pop(t, None)  # a store whose writes fail is not asked again now
        return written, left

    # ------------------------------------------------------------------ transfers
    def _segment(self, info: StoreInfo) -> int | None:
        seg = self._segments.get(info.segment_name)
        if seg is None:
            desc = self.metadata.get_segment(info.segment_name)
            if desc is None:
                log.warning("pool: store %s's segment %s is not in the metadata store",
                            info.name, info.segment_name)
                return None
            try:
                seg = self._segments[info.segment_name] = self.engine.open_segment(desc)
            except Exception as e:  # the native engine's errors: this store is a miss
                log.warning("pool: cannot open store %s's segment: %s", info.name, e)
                return None
        return seg

    def _submit(self, info: StoreInfo, op: str, local: Sequence[int],
                remote: Sequence[int]) -> int | None:
        seg = self._segment(info)
        if seg is None:
            return None
        try:
            return self.engine.submit(seg, op, list(local), list(remote),
                                      [self.entry_bytes] * len(local))
        except Exception as e:  # the native engine's errors: this store is a miss
            log.warning("pool: %s with store %s could not start: %s", op, info.name, e)
            return None

    def _finish(self, info: StoreInfo, batch: int) -> bool:
        try:
            self.engine.wait(batch)
            return True
        except TransferError as e:
            log.warning("pool: transfer with store %s failed: %s", info.name, e)
            return False
        finally:
            self.engine.release(batch)
