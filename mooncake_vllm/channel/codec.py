"""Versioned records on the wire: one codec per protocol.

Every protocol on the channel is a tagged union of frozen msgspec structs whose fields are all
bounded, each with a version field `v`. A frame is refused (BadMessage, naming why) when it is
over the protocol's size cap (checked before decoding), does not decode into a known record,
breaks a field bound, or carries another version: peers of different versions fail at first
contact with a reason instead of misreading each other.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")
MAX_FRAME_BYTES = 1 << 20


class BadMessage(ValueError):
    """A frame that is not a record of this protocol; the message says why."""


def _label(msg: Any) -> str:
    """The record's kind and id, for errors and logs."""
    rid = getattr(msg, "transfer_id", None) or getattr(msg, "id", None)
    return f"{type(msg).__name__} {rid!r}" if rid is not None else type(msg).__name__


class Codec(Generic[T]):
    def __init__(self, records: Any, version: int, what: str,
                 max_bytes: int = MAX_FRAME_BYTES) -> None:
        self.version, self.what, self.max_bytes = version, what, max_bytes
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(records)

    def encode(self, msg: T) -> bytes:
        return self._encoder.encode(msg)

    def decode(self, frame: bytes) -> T:
        if len(frame) > self.max_bytes:
            raise BadMessage(f"{self.what} frame of {len(frame)} bytes (at most "
                             f"{self.max_bytes})")
        try:
            msg = self._decoder.decode(frame)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise BadMessage(f"undecodable {self.what} frame ({len(frame)} bytes): {e}") from e
        version = getattr(msg, "v", None)
        if version != self.version:
            raise BadMessage(f"{_label(msg)} has {self.what} protocol version {version}, this "
                             f"side speaks {self.version}")
        return msg
