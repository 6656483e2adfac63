"""The third record kind: a KV pool node (`mooncake-vllm store`), under `stores/<name>`.

Clients take the live store nodes from this list (membership by the node's etcd lease: a
node that dies leaves it within the lease's TTL) and place blocks on them by rendezvous
hashing; the record says where to reach the node and what its slots hold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .base import SCHEMA_VERSION, MalformedValueError, _dump, _load, _require_int, _require_str

MAX_SLOT_BYTES = 1 << 32


@dataclass(frozen=True)
class StoreInfo:
    name: str  # unique in the namespace; also the rendezvous identity
    control_endpoint: str  # the node's store channel (tcp://host:port)
    segment_name: str  # its engine segment: the pool's DRAM, one-sided READ and WRITE
    slot_bytes: int  # one entry at most (ShardSpace.entry_bytes must fit)
    dram_slots: int
    ssd_slots: int = 0
    status_url: str = ""  # its HTTP /status and /metrics

    def __post_init__(self) -> None:
        _require_str("store name", self.name)
        if "/" in self.name or len(self.name) > 128:
            raise MalformedValueError(f"store name {self.name!r} must be at most 128 "
                                      "characters without '/'")
        for name in ("control_endpoint", "segment_name"):
            _require_str(name, getattr(self, name))
        _require_str("status_url", self.status_url, allow_empty=True)
        _require_int("slot_bytes", self.slot_bytes, 1)
        if self.slot_bytes > MAX_SLOT_BYTES:
            raise MalformedValueError(f"slot_bytes {self.slot_bytes} over {MAX_SLOT_BYTES}")
        _require_int("dram_slots", self.dram_slots, 1)
        _require_int("ssd_slots", self.ssd_slots, 0)

    def to_json(self) -> bytes:
        return _dump({"schema": SCHEMA_VERSION, "kind": "store", **asdict(self)})

    @classmethod
    def from_json(cls, raw: bytes | str) -> StoreInfo:
        d = _load(raw, "store")
        fields = ("name", "control_endpoint", "segment_name", "slot_bytes", "dram_slots",
                  "ssd_slots", "status_url")
        missing = [k for k in fields[:5] if k not in d]
        if missing:
            raise MalformedValueError(f"store lacks {', '.join(missing)}")
        try:
            return cls(**{k: d[k] for k in fields if k in d})
        except TypeError as e:
            raise MalformedValueError(str(e)) from e
