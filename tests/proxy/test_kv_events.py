"""The conductor's view of an instance's prefix cache, from vLLM's KV cache events: batches
encoded with vLLM's own event classes, handed to a feed message by message (no sockets)."""

from __future__ import annotations

import msgspec
from vllm.distributed.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventBatch,
)

from mooncake_vllm.proxy.kv_events import KVEventFeed
from mooncake_vllm.proxy.prefix_index import PrefixIndex
from mooncake_vllm.proxy.prompt import PromptHasher

BS = 4
TOKENS = list(range(100, 112))  # three blocks


def _stored(hashes: list[bytes], tokens: list[int], parent: bytes | None = None,
            size: int = BS) -> BlockStored:
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens,
                       block_size=size, lora_id=None, medium="GPU", lora_name=None)


class Feed:
    def __init__(self) -> None:
        self.index = PrefixIndex(1000)
        self.feed = KVEventFeed("tcp://127.0.0.1:1", self.index, BS, name="test")
        self.seq = 0

    def send(self, *events: object, seq: int | None = None) -> None:
        self.seq = self.seq + 1 if seq is None else seq
        payload = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=list(events)))
        self.feed.handle([b"", self.seq.to_bytes(8, "big"), payload])

    def matched(self, tokens: list[int]) -> int:
        return self.index.match(PromptHasher(None, BS).from_token_ids(tokens).block_hashes)


def test_stored_blocks_match_the_conductors_keys_of_the_same_tokens() -> None:
    f = Feed()
    f.send(_stored([b"h1", b"h2"], TOKENS[:8]))
    assert f.matched(TOKENS) == 2
    f.send(_stored([b"h3"], TOKENS[8:12], parent=b"h2"))  # chained on its parent
    assert f.matched(TOKENS) == 3
    assert f.matched([999, *TOKENS[1:]]) == 0  # another first token: nothing in common


def test_removed_and_cleared_blocks_leave_the_index() -> None:
    f = Feed()
    f.send(_stored([b"h1", b"h2", b"h3"], TOKENS))
    f.send(BlockRemoved(block_hashes=[b"h2"], medium="GPU"))
    assert f.matched(TOKENS) == 1
    f.send(AllBlocksCleared())
    assert f.matched(TOKENS) == 0 and len(f.index) == 0


def test_a_block_whose_parent_was_never_seen_is_skipped() -> None:
    f = Feed()
    f.send(_stored([b"h3"], TOKENS[8:12], parent=b"h2"))
    assert len(f.index) == 0 and f.feed.stats["unchained"] == 1


def test_a_gap_in_the_sequence_empties_the_index() -> None:
    f = Feed()
    f.send(_stored([b"h1"], TOKENS[:4]))
    f.send(_stored([b"h2"], TOKENS[4:8], parent=b"h1"), seq=5)  # 2..4 lost
    assert f.feed.stats["gaps"] == 1
    assert f.matched(TOKENS) == 0  # h1 forgotten; h2's parent now unknown too


def test_another_block_size_is_ignored() -> None:
    f = Feed()
    f.send(_stored([b"h1"], TOKENS[:8], size=8))
    assert len(f.index) == 0 and f.feed.stats["bad"] == 0


def test_hostile_messages_are_dropped_and_the_feed_goes_on() -> None:
    f = Feed()
    for frames in ([b"only one"], [b"", b"short", b""], [b"", bytes(8), b"\xc1 not msgpack"],
                   [b"", bytes(8), msgspec.msgpack.encode({"not": "a batch"})],
                   [b"", bytes(8), msgspec.msgpack.encode([0.0, [{"type": "BlockStored",
                                                                  "block_hashes": [b"x" * 99],
                                                                  "token_ids": [1, 2, 3, 4],
                                                                  "block_size": BS}]])],
                   [b"", bytes(8), msgspec.msgpack.encode([0.0, [{"type": "BlockStored",
                                                                  "block_hashes": [b"h"],
                                                                  "token_ids": [1, 2],
                                                                  "block_size": BS}]])]):
        f.feed.handle(frames)
    assert f.feed.stats["bad"] == 6 and len(f.index) == 0
    f.send(_stored([b"h1"], TOKENS[:4]), seq=100)
    assert f.matched(TOKENS) == 1
