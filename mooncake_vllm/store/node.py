"""A store node's side of the pool protocol (messages.py): lending the pool's slots to
clients' one-sided writes and reads, and taking them back.

Driven by the channel thread (`on_message`, `tick`); it takes a Pool and a `send(to, message)`
function, so tests drive it message by message, as the connector's sides are.

Failure rules (the only place they are stated for the store):
- A slot reserved for a client's write is visible to no reader until that client commits it.
  The client posts no write later than `lease_s` after asking; the store takes an uncommitted
  slot back only `lease_s + landing_s` after the reservation (`landing_s`: how late a posted
  write can still land, the engine's timeout and a margin), so no late write can land in a
  slot given to another entry. A client's Abort (it sends one only once no write of its can
  land) frees its slots at once.
- A pinned entry stays in DRAM until its client unpins it, or `lease_s + landing_s` after the
  pin (a read posted within the lease has landed by then).
- Commit, Abort and Unpin are taken only from the client that reserved or pinned (by its
  channel identity and id); anything else is refused and logged. A repeated id is refused.
- Hot spots (placement.py): a Lookup is sent to each key's primary owner, which counts it as
  a read of each key asked and answers, per key, how many owners should hold it. A reader
  that loaded a block that should have more copies writes it to the next owners, marked
  `replica`; a replica no reader has pinned for two windows is dropped by its node.
- What one client can hold open is bounded (`max_open` reservations and pins, each at most
  messages.MAX_KEYS keys); a pool full of pinned or reserved slots answers Reserved with
  fewer addresses and the reason. An error in one message is logged; the node goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mooncake_vllm.store import messages as m
from mooncake_vllm.store.placement import HotSpots
from mooncake_vllm.store.pool import Pool, PoolFull

log = logging.getLogger(__name__)
V = m.PROTOCOL_VERSION
Send = Callable[[bytes, m.Message], None]


@dataclass
class _Open:
    pinned: bool  # a pin (else a reservation)
    keys: list[bytes]  # the keys holding a slot for it
    until: float  # when the store takes them back unasked


class StoreNode:
    def __init__(self, pool: Pool, send: Send, landing_s: float = 35.0,
                 max_open: int = 1024, hot: HotSpots | None = None) -> None:
        self.pool, self._send, self.landing_s, self.max_open = pool, send, landing_s, max_open
        self.hot = hot or HotSpots()
        self.lock = threading.Lock()
        self._open: dict[tuple[bytes, str], _Open] = {}
        self._per_client: dict[bytes, int] = {}
        self._replicas: dict[bytes, float] = {}  # replica entry -> when last reserved or read
        self.stats = {"lookups": 0, "reserved": 0, "committed": 0, "expired": 0, "pins": 0,
                      "refused": 0, "replicas_written": 0, "replicas_dropped": 0}

    def on_message(self, sender: bytes, msg: m.Message, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.lock:
            try:
                self._handle(sender, msg, now)
            except Exception:  # one bad message must not end the channel thread
                log.exception("store: %s %r from %r failed", type(msg).__name__,
                              getattr(msg, "id", "?"), sender)

    def _handle(self, sender: bytes, msg: m.Message, now: float) -> None:
        if isinstance(msg, m.Lookup):
            self.stats["lookups"] += 1
            copies = []
            for key in msg.keys:
                if msg.count:
                    self.hot.read(key, now)
                copies.append(self.hot.target(key, now))
            self._send(sender, m.Located(V, msg.id, self.pool.lookup(msg.keys), copies))
        elif isinstance(msg, m.Reserve):
            if self._refused(sender, msg.id):
                self._send(sender, m.Reserved(V, msg.id, [], "refused: id in use, or too "
                                              "many reservations and pins open"))
                return
            addresses, held, reason = [], [], ""
            for key in msg.keys:
                try:
                    address = self.pool.reserve(key)
                except PoolFull as e:
                    reason = str(e)
                    break
                addresses.append(address or 0)
                if address:
                    held.append(key)
                    if msg.replica:
                        self._replicas[key] = now
            self._hold(sender, msg.id, _Open(False, held, now + msg.lease_s + self.landing_s))
            self.stats["reserved"] += len(held)
            self._send(sender, m.Reserved(V, msg.id, addresses, reason))
        elif isinstance(msg, m.Pin):
            if self._refused(sender, msg.id):
                self._send(sender, m.Pinned(V, msg.id, []))
                return
            addresses, held = [], []
            for key in msg.keys:
                try:
                    address = self.pool.pin(key)
                except PoolFull:  # an SSD entry with no DRAM slot to come back into
                    address = None
                if address is None:
                    break
                addresses.append(address)
                held.append(key)
                if key in self._replicas:
                    self._replicas[key] = now
            self._hold(sender, msg.id, _Open(True, held, now + msg.lease_s + self.landing_s))
            self.stats["pins"] += len(held)
            self._send(sender, m.Pinned(V, msg.id, addresses))
        elif isinstance(msg, m.Commit | m.Abort | m.Unpin):
            entry = self._open.get((sender, msg.id))
            want_pin = isinstance(msg, m.Unpin)
            if entry is None or entry.pinned != want_pin:
                self.stats["refused"] += 1
                log.warning("store: refused %s %r from %r: nothing of that client's open "
                            "under that id", type(msg).__name__, msg.id, sender)
                return
            self._close(sender, msg.id, commit=isinstance(msg, m.Commit))
        else:
            log.warning("store: refused %s from %r (wrong direction)", type(msg).__name__,
                        sender)

    def _refused(self, sender: bytes, rid: str) -> bool:
        if (sender, rid) in self._open or self._per_client.get(sender, 0) >= self.max_open:
            self.stats["refused"] += 1
            log.warning("store: refused %r from %r: id in use or %d open", rid, sender,
                        self._per_client.get(sender, 0))
            return True
        return False

    def _hold(self, sender: bytes, rid: str, entry: _Open) -> None:
        self._open[(sender, rid)] = entry
        self._per_client[sender] = self._per_client.get(sender, 0) + 1

    def _close(self, sender: bytes, rid: str, commit: bool = False) -> None:
        entry = self._open.pop((sender, rid))
        left = self._per_client[sender] - 1
        if left:
            self._per_client[sender] = left
        else:
            del self._per_client[sender]
        for key in entry.keys:
            if entry.pinned:
                self.pool.unpin(key)
            elif commit:
                self.pool.commit(key)
                if key in self._replicas:
                    self.stats["replicas_written"] += 1
            else:
                self.pool.abort(key)
                self._replicas.pop(key, None)
        if commit:
            self.stats["committed"] += len(entry.keys)

    def tick(self, now: float | None = None) -> None:
        """Take back what clients left open past their lease and the landing bound."""
        now = time.monotonic() if now is None else now
        with self.lock:
            for (sender, rid), entry in list(self._open.items()):
                if now >= entry.until:
                    self.stats["expired"] += 1
                    log.warning("store: %s %r of %r expired: %d slots taken back",
                                "pin" if entry.pinned else "reservation", rid, sender,
                                len(entry.keys))
                    self._close(sender, rid)
            cold = now - 2 * self.hot.window_s
            for key, last in list(self._replicas.items()):
                if last <= cold and self.pool.drop(key):
                    del self._replicas[key]
                    self.stats["replicas_dropped"] += 1
                elif self.pool.where(key) is None and not self.pool.busy(key):
                    del self._replicas[key]  # evicted meanwhile

    def open_count(self) -> int:
        with self.lock:
            return len(self._open)
