"""Records between a client (an instance's worker) and a store node.

Versioned msgspec structs, tagged by kind, every field bounded; a frame that does not decode
into a known record of this version is refused with a reason (the same rules as the
connector's control records). Block data never travels here: a client reads and writes the
addresses these records give with the transfer engine, one-sided.

  client -> store  Lookup    "how many of these keys, from the first, do you hold?" (sent to
                             each key's primary owner, which counts it as a read of each key)
  store -> client  Located   the count, and per key the copies it should have (hot spots)
  client -> store  Reserve   "give me slots to write these keys into" (for lease_s); `replica`:
                             copies of hot blocks, dropped by this node once they cool
  store -> client  Reserved  one address per key; 0: held or being written already (skip)
  client -> store  Commit    "written": the entries become visible; Abort: "not written"
  client -> store  Pin       "hold these for my reads" (for lease_s), leading held keys only
  store -> client  Pinned    their addresses, in order; fewer than asked: a miss ends them
  client -> store  Unpin     "read": the slots may be evicted again
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from mooncake_vllm.channel.codec import MAX_FRAME_BYTES as MAX_FRAME_BYTES
from mooncake_vllm.channel.codec import BadMessage as BadMessage
from mooncake_vllm.channel.codec import Codec
from mooncake_vllm.store.keys import KEY_BYTES

PROTOCOL_VERSION = 1
MAX_KEYS = 4096  # one request's blocks: 131072 tokens of 32-token blocks

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Key = Annotated[bytes, msgspec.Meta(min_length=KEY_BYTES, max_length=KEY_BYTES)]
Keys = Annotated[list[Key], msgspec.Meta(max_length=MAX_KEYS)]
Address = Annotated[int, msgspec.Meta(ge=0, lt=1 << 62)]
Lease = Annotated[float, msgspec.Meta(gt=0, le=600)]
Text = Annotated[str, msgspec.Meta(max_length=1024)]


class Lookup(msgspec.Struct, tag="lookup", frozen=True):
    v: int
    id: Id
    keys: Keys
    count: bool = True  # a read of each key for the hot-spot rule (a conductor's is not)


class Located(msgspec.Struct, tag="located", frozen=True):
    v: int
    id: Id
    held: Annotated[int, msgspec.Meta(ge=0, le=MAX_KEYS)]
    # Per key asked: how many owners (in rendezvous order) should hold it (placement.HotSpots).
    copies: Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=16)]],
                      msgspec.Meta(max_length=MAX_KEYS)] = []


class Reserve(msgspec.Struct, tag="reserve", frozen=True):
    v: int
    id: Id
    keys: Keys
    lease_s: Lease
    replica: bool = False


class Reserved(msgspec.Struct, tag="reserved", frozen=True):
    v: int
    id: Id
    addresses: Annotated[list[Address], msgspec.Meta(max_length=MAX_KEYS)]
    reason: Text = ""  # why none or fewer were reserved (the pool is full of pinned slots)


class Commit(msgspec.Struct, tag="commit", frozen=True):
    v: int
    id: Id


class Abort(msgspec.Struct, tag="abort", frozen=True):
    v: int
    id: Id


class Pin(msgspec.Struct, tag="pin", frozen=True):
    v: int
    id: Id
    keys: Keys
    lease_s: Lease


class Pinned(msgspec.Struct, tag="pinned", frozen=True):
    v: int
    id: Id
    addresses: Annotated[list[Address], msgspec.Meta(max_length=MAX_KEYS)]


class Unpin(msgspec.Struct, tag="unpin", frozen=True):
    v: int
    id: Id


Message = (Lookup | Located | Reserve | Reserved | Commit | Abort | Pin | Pinned | Unpin)
CODEC: Codec[Message] = Codec(Message, PROTOCOL_VERSION, "store", MAX_FRAME_BYTES)
encode, decode = CODEC.encode, CODEC.decode
