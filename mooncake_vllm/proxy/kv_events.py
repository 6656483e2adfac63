"""What each instance's vLLM prefix cache holds, from vLLM's own KV cache events.

vLLM publishes every block it caches and evicts when started with `--kv-events-config
'{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:5557"}'`: msgpack
batches on a ZMQ PUB socket, each message [topic, 8-byte sequence number, batch], a batch being
[timestamp, [event, ...], ...] and an event a map tagged "BlockStored" (block_hashes,
parent_block_hash, token_ids, block_size), "BlockRemoved" (block_hashes) or
"AllBlocksCleared". A feed per instance (`--kv-events URL=tcp://HOST:PORT`) subscribes and
keeps the instance's PrefixIndex true:

- a stored block is inserted under the conductor's own hash of its tokens (prompt.py's chain,
  so a prompt's key matches it), chained on its parent's; a block whose parent the feed has not
  seen (stored before the feed connected) cannot be chained and is skipped;
- a removed block is dropped; a cleared cache empties the index;
- a gap in the sequence numbers (messages lost, or vLLM restarted) empties the index: what was
  evicted meanwhile is unknown, and fewer predicted hits is the safe error;
- events of another block size than the conductor's `--block-tokens` cannot match its keys:
  ignored, with one warning.

Every message is hostile until checked: a batch that does not decode into that shape is
dropped with a warning (at most one a minute per feed), and the table from vLLM's hashes to
ours is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from mooncake_vllm.proxy.prefix_index import PrefixIndex
from mooncake_vllm.proxy.prompt import block_hash, chain_digest, token_block_bytes

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 << 20
MAX_HASH_BYTES = 64
MAX_KNOWN = 1 << 18  # vLLM block hashes remembered, per instance
_WARN_EVERY_S = 60.0


class BadEvent(ValueError):
    pass


def _vllm_hash(h: object) -> bytes | int:
    if isinstance(h, bytes) and 0 < len(h) <= MAX_HASH_BYTES:
        return h
    if isinstance(h, int) and not isinstance(h, bool):
        return h
    raise BadEvent(f"block hash {h!r:.40} is neither bytes (1..{MAX_HASH_BYTES}) nor an int")


def _list(event: dict, key: str) -> list:
    value = event.get(key)
    if not isinstance(value, list):
        raise BadEvent(f"{event.get('type')}.{key} is not a list")
    return value


class KVEventFeed:
    """One instance's events -> its PrefixIndex (module docstring)."""

    def __init__(self, endpoint: str, index: PrefixIndex, block_tokens: int,
                 name: str = "") -> None:
        self.endpoint, self.index, self.block_tokens = endpoint, index, block_tokens
        self.name = name or endpoint
        # vLLM's hash of a block -> our digest of it (what its children chain on).
        self._ours: OrderedDict[bytes | int, bytes] = OrderedDict()
        self._last_seq: int | None = None
        self._warned_at = -_WARN_EVERY_S
        self._warned_size = False
        self.stats = {"batches": 0, "stored": 0, "removed": 0, "cleared": 0, "unchained": 0,
                      "gaps": 0, "bad": 0}
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ messages
    def handle(self, frames: list[bytes]) -> None:
        """One message as it came off the socket; never raises."""
        try:
            if len(frames) != 3 or len(frames[1]) != 8:
                raise BadEvent(f"{len(frames)} frames (expected topic, sequence, batch)")
            seq = int.from_bytes(frames[1], "big")
            batch = msgspec.msgpack.decode(frames[2])
            if not isinstance(batch, list | tuple) or len(batch) < 2 or not isinstance(
                    batch[1], list):
                raise BadEvent("a batch is [timestamp, [events], ...]")
            if self._last_seq is not None and seq != self._last_seq + 1:
                self.stats["gaps"] += 1
                log.warning("kv events of %s: sequence %d after %d; what it holds is unknown "
                            "until new events say", self.name, seq, self._last_seq)
                self._clear()
            self._last_seq = seq
            for event in batch[1]:
                self._apply(event)
            self.stats["batches"] += 1
        except (BadEvent, msgspec.DecodeError, ValueError, TypeError) as e:
            self.stats["bad"] += 1
            now = time.monotonic()
            if now - self._warned_at >= _WARN_EVERY_S:
                self._warned_at = now
                log.warning("kv events of %s: dropped a message: %s", self.name, e)

    def _apply(self, event: Any) -> None:
        if not isinstance(event, dict):
            raise BadEvent("an event is a map")
        kind = event.get("type")
        if kind == "BlockStored":
            self._stored(event)
        elif kind == "BlockRemoved":
            hashes = [_vllm_hash(h) for h in _list(event, "block_hashes")]
            ours = [self._ours.pop(h, None) for h in hashes]
            self.index.remove([block_hash(d) for d in ours if d is not None])
            self.stats["removed"] += len(hashes)
        elif kind == "AllBlocksCleared":
            self.stats["cleared"] += 1
            self._clear()
        # Other kinds (newer vLLMs may add some) say nothing about the prefix cache.

    def _stored(self, event: dict) -> None:
        size = event.get("block_size")
        hashes = [_vllm_hash(h) for h in _list(event, "block_hashes")]
        tokens = _list(event, "token_ids")
        if size != self.block_tokens:
            if not self._warned_size:
                self._warned_size = True
                log.warning("kv events of %s: block size %r, the conductor's is %d "
                            "(--block-tokens): its events cannot match prompts and are "
                            "ignored", self.name, size, self.block_tokens)
            return
        if len(tokens) != len(hashes) * size or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise BadEvent(f"BlockStored: {len(tokens)} token ids for {len(hashes)} blocks "
                           f"of {size}")
        parent = event.get("parent_block_hash")
        if parent is None:
            prev = b""
        else:
            found = self._ours.get(_vllm_hash(parent))
            if found is None:  # stored before we listened: its chain is unknown
                self.stats["unchained"] += len(hashes)
                return
            prev = found
        inserted = []
        for i, h in enumerate(hashes):
            prev = chain_digest(prev, token_block_bytes(tokens[i * size:(i + 1) * size]))
            self._ours[h] = prev
            self._ours.move_to_end(h)
            inserted.append(block_hash(prev))
        while len(self._ours) > MAX_KNOWN:
            self._ours.popitem(last=False)
        self.index.insert(inserted)
        self.stats["stored"] += len(inserted)

    def _clear(self) -> None:
        self._ours.clear()
        self.index.clear()

    # ------------------------------------------------------------------ socket
    def start(self, ctx: zmq.asyncio.Context) -> None:
        self._task = asyncio.create_task(self._run(ctx))

    async def _run(self, ctx: zmq.asyncio.Context) -> None:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect(self.endpoint)
        log.info("kv events of %s: subscribed to %s", self.name, self.endpoint)
        try:
            while True:
                frames = await sock.recv_multipart()
                try:
                    self.handle(frames)
                except Exception:  # a bug of ours must not end the feed
                    log.exception("kv events of %s: a message could not be handled", self.name)
        finally:
            sock.close(linger=0)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
