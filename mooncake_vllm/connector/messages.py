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
"""

from __future__ import annotations

import msgspec

PROTOCOL_VERSION = 1


class LayoutInfo(msgspec.Struct, frozen=True):
    """What both sides must agree on before any byte moves, plus where D's blocks are."""

    model: str
    block_size: int
    dtype: str
    num_kv_heads: int
    head_size: int
    num_layers: int
    block_bytes: int  # bytes of one block in one plane of one layer
    tp_rank: int
    tp_size: int
    # Per layer, per plane (e.g. K and V when they are split): [base address, block stride].
    planes: list[list[tuple[int, int]]]


class Register(msgspec.Struct, tag="register", frozen=True):
    v: int
    transfer_id: str
    engine_id: str
    segment_name: str
    segment: dict | None  # the descriptor itself in p2p mode; None: look it up by name
    layout: LayoutInfo
    first_block: int  # blocks [0, first_block) D already holds (its own prefix-cache hit)
    block_ids: list[int]  # D's block ids for logical blocks first_block, first_block+1, ...
    num_tokens: int
    # Pipelined prefill: D computes the rest of the prompt while P computes this head, and
    # each of D's layers waits for P's: P reports every layer as soon as it is written.
    layer_progress: bool = False


class Watch(msgspec.Struct, tag="watch", frozen=True):
    v: int
    transfer_id: str


class Started(msgspec.Struct, tag="started", frozen=True):
    v: int
    transfer_id: str
    started: bool  # False: a heartbeat, the head is still queued on P


class Release(msgspec.Struct, tag="release", frozen=True):
    v: int
    transfer_id: str
    reason: str


class Layers(msgspec.Struct, tag="layers", frozen=True):
    v: int
    transfer_id: str
    written: int  # layers [0, written) are complete in D's blocks


class Done(msgspec.Struct, tag="done", frozen=True):
    v: int
    transfer_id: str
    ok: bool
    reason: str = ""
    bytes: int = 0
    blocks: int = 0
    transfer_s: float = 0.0  # first write posted -> last write complete
    exposed_s: float = 0.0  # end of P's forward pass -> last write complete


class Released(msgspec.Struct, tag="released", frozen=True):
    v: int
    transfer_id: str


Message = Watch | Started | Register | Release | Layers | Done | Released

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class BadMessage(ValueError):
    """A frame that is not a record of this protocol; the message says why."""


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(frame: bytes) -> Message:
    try:
        msg = _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BadMessage(f"undecodable control frame ({len(frame)} bytes): {e}") from e
    if msg.v != PROTOCOL_VERSION:
        raise BadMessage(
            f"{type(msg).__name__} for transfer {msg.transfer_id!r} has protocol version "
            f"{msg.v}, this side speaks {PROTOCOL_VERSION}"
        )
    return msg


def layout_mismatch(mine: LayoutInfo, theirs: LayoutInfo) -> str | None:
    """Why two layouts cannot exchange blocks, naming both values; None when compatible."""
    for key in ("model", "block_size", "dtype", "num_kv_heads", "head_size", "num_layers",
                "block_bytes", "tp_size"):
        a, b = getattr(mine, key), getattr(theirs, key)
        if a != b:
            return f"KV layout mismatch: {key} is {a!r} on prefill but {b!r} on decode"
    if len(theirs.planes) != theirs.num_layers or any(
        len(p) != len(q) for p, q in zip(mine.planes, theirs.planes, strict=False)
    ):
        return "KV layout mismatch: planes per layer differ between prefill and decode"
    return None
