"""Records on the control channel between decode (D) and prefill (P) workers.

Small msgspec structs, tagged by kind, each with a protocol version. A frame that does not
decode into a known record of this version is refused with a reason the caller logs; nothing
from the network is trusted further than its type.

  D -> P  Watch     "tell me when you start computing this pipelined head" (before Register)
  P -> D  Started   "its last chunk is in the step I am running now" (started), or, every
                    half second until then, "still queued here" (not started)
  D -> P  Register  "write this transfer's KV into these blocks of mine"
  D -> P  Release   "stop: I no longer want it (aborted, or already cached)"
  P -> D  Layers    "layers [0, n) are written" (only when the registration asked for it)
  P -> D  Done      "every layer is written" (ok) or why not (refused, failed, aborted)
  P -> D  Released  "no write of mine will touch your blocks any more"
  any -> worker Ping / Pong  health probe: the engine self-check and the threads are fine;
                    the Pong also says where the worker's scratch region is (doctor writes)
  doctor -> worker Check / Checked  "from your side: ping this peer's control endpoint and,
                    if asked, write into its scratch region" (never KV memory), and the result
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from mooncake_vllm.channel.codec import MAX_FRAME_BYTES as MAX_FRAME_BYTES
from mooncake_vllm.channel.codec import BadMessage as BadMessage
from mooncake_vllm.channel.codec import Codec

PROTOCOL_VERSION = 1

# Bounds on every field, checked by the decoder before a handler sees the record: what would
# overflow an int64 in the address arithmetic, or hold memory out of proportion to a real
# request, is refused as malformed.
MAX_BLOCKS = 1 << 16  # block ids in one registration (a million tokens of 16-token blocks)
MAX_LAYERS = 4096
MAX_PLANES = 8
MAX_KV_HEADS = 4096
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
Count = Annotated[int, msgspec.Meta(ge=0, lt=1 << 40)]
Small = Annotated[int, msgspec.Meta(ge=0, lt=1 << 20)]
BlockId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]
Address = Annotated[int, msgspec.Meta(ge=0, lt=1 << 62)]
Stride = Annotated[int, msgspec.Meta(gt=0, lt=1 << 40)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=1e6)]


class LayoutInfo(msgspec.Struct, frozen=True):
    """What both sides must agree on before any byte moves, plus where D's blocks are."""

    model: Text
    block_size: Annotated[int, msgspec.Meta(gt=0, lt=1 << 20)]
    dtype: Annotated[str, msgspec.Meta(max_length=64)]
    num_kv_heads: Small
    head_size: Small
    num_layers: Annotated[int, msgspec.Meta(gt=0, le=MAX_LAYERS)]
    block_bytes: Stride  # bytes of one block in one plane of one layer
    tp_rank: Annotated[int, msgspec.Meta(ge=0, lt=1024)]
    tp_size: Annotated[int, msgspec.Meta(gt=0, le=1024)]
    # Per layer, per plane (e.g. K and V when they are split): [base address, block stride].
    planes: Annotated[list[Annotated[list[tuple[Address, Stride]],
                                     msgspec.Meta(min_length=1, max_length=MAX_PLANES)]],
                      msgspec.Meta(max_length=MAX_LAYERS)]
    # Between different tensor-parallel sizes (tp_mapping.py, head_slices.py): the model's KV
    # heads over all ranks, and where one head lies in a block (layout.HeadGeometry: outer
    # count, outer stride, head stride, head bytes); None where it is not known.
    # Bounded well past any model's KV heads: the head plan walks every head once.
    total_kv_heads: Annotated[int, msgspec.Meta(ge=0, le=MAX_KV_HEADS)] = 0
    heads: tuple[Small, Count, Count, Count] | None = None


class Register(msgspec.Struct, tag="register", frozen=True):
    v: int
    transfer_id: Id
    engine_id: Text
    segment_name: Text
    segment: dict | None  # the descriptor itself in p2p mode; None: look it up by name
    layout: LayoutInfo
    first_block: BlockId  # blocks [0, first_block) D already holds (its own prefix-cache hit)
    # D's block ids for logical blocks first_block, first_block+1, ...
    block_ids: Annotated[list[BlockId], msgspec.Meta(max_length=MAX_BLOCKS)]
    num_tokens: Annotated[int, msgspec.Meta(gt=0, lt=1 << 40)]
    # Pipelined prefill: D computes the rest of the prompt while P computes this head, and
    # each of D's layers waits for P's: P reports every layer as soon as it is written.
    layer_progress: bool = False
    # How long D waits for this transfer from sending the registration: P posts no write
    # after that long from receiving it, so D knows when no write of P's can still land.
    wait_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0
    # D takes its blocks back this long after sending this, whatever P says: P refuses a
    # registration whose writes could land later than that (its own engine timeout).
    horizon_s: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 132.0


class Watch(msgspec.Struct, tag="watch", frozen=True):
    v: int
    transfer_id: Id


class Started(msgspec.Struct, tag="started", frozen=True):
    v: int
    transfer_id: Id
    started: bool  # False: a heartbeat, the head is still queued on P


class Release(msgspec.Struct, tag="release", frozen=True):
    v: int
    transfer_id: Id
    reason: Text


class Layers(msgspec.Struct, tag="layers", frozen=True):
    v: int
    transfer_id: Id
    # Layers [0, written) are complete in D's blocks.
    written: Annotated[int, msgspec.Meta(ge=0, le=MAX_LAYERS)]


class Done(msgspec.Struct, tag="done", frozen=True):
    v: int
    transfer_id: Id
    ok: bool
    reason: Text = ""
    bytes: Count = 0
    blocks: Count = 0
    transfer_s: Seconds = 0.0  # first write posted -> last write complete
    exposed_s: Seconds = 0.0  # end of P's forward pass -> last write complete


class Released(msgspec.Struct, tag="released", frozen=True):
    v: int
    transfer_id: Id


class Ping(msgspec.Struct, tag="ping", frozen=True):
    """Anyone with the cluster token (a conductor, the doctor) -> a worker: are you healthy?"""

    v: int
    transfer_id: Id  # the probe's own id, echoed


class Pong(msgspec.Struct, tag="pong", frozen=True):
    v: int
    transfer_id: Id
    healthy: bool
    reason: Text = ""  # why not, when not
    tp_rank: int = 0
    # The worker's engine segment and a scratch region in it that a doctor's test write may
    # overwrite (never KV memory): [address, bytes].
    segment: dict | None = None
    scratch: tuple[Address, Count] | None = None


class Check(msgspec.Struct, tag="check", frozen=True):
    """The doctor -> a worker: check `peer` (a worker's control endpoint) from your side."""

    v: int
    transfer_id: Id  # the check's own id, echoed
    peer: Text
    write: bool = False  # also write into the peer's scratch region through the engine


class Checked(msgspec.Struct, tag="checked", frozen=True):
    v: int
    transfer_id: Id
    ok: bool
    reason: Text = ""  # what failed, when not ok
    protocol: Annotated[str, msgspec.Meta(max_length=16)] = ""  # the engine's, for writes
    latency_s: Seconds = 0.0  # the fastest of a few one-page writes
    bytes: Count = 0  # written in `seconds` by the bandwidth writes
    seconds: Seconds = 0.0


Message = (Watch | Started | Register | Release | Layers | Done | Released | Ping | Pong
           | Check | Checked)

CODEC: Codec[Message] = Codec(Message, PROTOCOL_VERSION, "control", MAX_FRAME_BYTES)
encode, decode = CODEC.encode, CODEC.decode


def layout_mismatch(mine: LayoutInfo, theirs: LayoutInfo) -> str | None:
    """Why two layouts cannot exchange blocks, naming both values; None when compatible."""
    # Between different tensor-parallel sizes a block holds other heads on each side: the
    # head plan (tp_mapping.head_runs_into) checks what those layouts must share.
    same_tp = ("num_kv_heads", "block_bytes", "tp_size") if mine.tp_size == theirs.tp_size \
        else ()
    for key in ("model", "block_size", "dtype", "head_size", "num_layers", *same_tp):
        a, b = getattr(mine, key), getattr(theirs, key)
        if a != b:
            return f"KV layout mismatch: {key} is {a!r} on prefill but {b!r} on decode"
    if len(theirs.planes) != theirs.num_layers or any(
        len(p) != len(q) for p, q in zip(mine.planes, theirs.planes, strict=False)
    ):
        return "KV layout mismatch: planes per layer differ between prefill and decode"
    return None
