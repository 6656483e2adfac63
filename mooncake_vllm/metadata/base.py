"""The metadata interface, the records it stores, and their wire form.

Three records live in the store, each as one JSON value under the cluster namespace:

- a *segment descriptor*: what `TransferEngine.descriptor()` returns (opaque here, only required
  to be a JSON object), published under the segment's name;
- an *instance* (`InstanceInfo`): one vLLM server of the cluster, its role, URLs and KV layout;
- a *store node* (`store_record.StoreInfo`): one node of the KV pool.

Every value carries `"schema": SCHEMA_VERSION` and a `"kind"`. A reader skips, with a warning,
any value it cannot trust: not JSON, another kind, a newer schema, missing or mistyped fields,
or a name that disagrees with its key. Unknown extra fields are ignored, so a newer writer can
add fields without breaking older readers.
"""

from __future__ import annotations

import json
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from .store_record import StoreInfo

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ROLES = ("prefill", "decode", "both")
Role = Literal["prefill", "decode", "both"]
InstanceEvent = Literal["put", "delete"]
InstanceCallback = Callable[[InstanceEvent, "InstanceInfo"], None]


class MetadataError(RuntimeError):
    """Base of the errors this package raises."""


class MetadataUnavailableError(MetadataError, ConnectionError):
    """The store cannot be reached at start (the message names the endpoints and what to check)."""


class MetadataConfigError(MetadataError, ValueError):
    """A metadata setting is wrong (the message names the setting and the bad value)."""


class MalformedValueError(ValueError):
    """A stored value is not a record this version can use (reason in the message)."""


@dataclass(frozen=True)
class KVLayoutRecord:
    """How one instance lays out its paged KV cache, as published in its record; a peer needs
    it to address blocks. (`connector.layout.KVLayout` is the worker's own memory map.)"""

    num_layers: int
    block_size: int  # tokens per block
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"
    num_kv_heads: int  # per TP rank
    head_size: int
    tp_rank: int = 0
    tp_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_layers", "block_size", "num_kv_heads", "head_size", "tp_size"):
            _require_int(name, getattr(self, name), minimum=1)
        _require_int("tp_rank", self.tp_rank, minimum=0)
        if self.tp_rank >= self.tp_size:
            raise MalformedValueError(f"tp_rank {self.tp_rank} is not below tp_size {self.tp_size}")
        _require_str("dtype", self.dtype)

    @classmethod
    def from_dict(cls, d: Any) -> KVLayoutRecord:
        if not isinstance(d, dict):
            raise MalformedValueError(f"kv_layout must be an object, got {type(d).__name__}")
        known = {k: d[k] for k in _KV_LAYOUT_FIELDS if k in d}
        missing = [k for k in _KV_LAYOUT_REQUIRED if k not in d]
        if missing:
            raise MalformedValueError(f"kv_layout lacks {', '.join(missing)}")
        return cls(**known)


# Bounds on a model's shape: far beyond any model served today, yet small enough that nothing
# derived from a record (a cut, a window) can overflow or take absurd values.
_SHAPE_MAXIMA = {"num_layers": 4096, "num_heads": 4096, "head_dim": 4096, "num_kv_heads": 4096,
                 "hidden_size": 1 << 20, "intermediate_size": 1 << 22, "block_size": 4096}
SHAPE_DTYPES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "int8")


@dataclass(frozen=True)
class ModelShape:
    """The served model's shape, per layer and across TP ranks: what a conductor needs to
    weigh attention against the rest of a layer (pipelined prefill's cut) without a flag."""

    num_layers: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    hidden_size: int
    intermediate_size: int
    dtype: str  # the model's compute dtype, torch's name without "torch."
    block_size: int  # tokens per KV block

    def __post_init__(self) -> None:
        for name, maximum in _SHAPE_MAXIMA.items():
            v = getattr(self, name)
            _require_int(name, v, minimum=1)
            if v > maximum:
                raise MalformedValueError(f"model_shape.{name} {v} is above {maximum}")
        if self.num_kv_heads > self.num_heads:
            raise MalformedValueError(f"model_shape.num_kv_heads {self.num_kv_heads} is above "
                                      f"num_heads {self.num_heads}")
        if self.dtype not in SHAPE_DTYPES:
            raise MalformedValueError(f"model_shape.dtype {self.dtype!r:.40} is not one of "
                                      f"{', '.join(SHAPE_DTYPES)}")

    @classmethod
    def from_dict(cls, d: Any) -> ModelShape:
        if not isinstance(d, dict):
            raise MalformedValueError(f"model_shape must be an object, got {type(d).__name__}")
        missing = [k for k in _MODEL_SHAPE_FIELDS if k not in d]
        if missing:
            raise MalformedValueError(f"model_shape lacks {', '.join(missing)}")
        return cls(**{k: d[k] for k in _MODEL_SHAPE_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_MODEL_SHAPE_FIELDS = ("num_layers", "num_heads", "head_dim", "num_kv_heads", "hidden_size",
                       "intermediate_size", "dtype", "block_size")

_KV_LAYOUT_FIELDS = ("num_layers", "block_size", "dtype", "num_kv_heads", "head_size",
                     "tp_rank", "tp_size")
_KV_LAYOUT_REQUIRED = _KV_LAYOUT_FIELDS[:5]


@dataclass(frozen=True)
class InstanceInfo:
    """One vLLM server of the cluster, as the proxy and its peers discover it.

    `remote_control` is the connector's opaque dict that the proxy forwards unchanged as
    `kv_transfer_params.remote_control` (per-rank control endpoints, engine id, ...);
    `extra` is free-form and for forward-compatible additions. Both must be JSON-serialisable.
    """

    instance_id: str
    role: Role
    http_url: str
    control_endpoint: str
    model: str
    engine_id: str = ""
    segment_name: str = ""
    kv_layout: KVLayoutRecord | None = None
    remote_control: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    model_shape: ModelShape | None = None

    def __post_init__(self) -> None:
        _require_str("instance_id", self.instance_id)
        if "/" in self.instance_id:
            raise MalformedValueError(f"instance_id {self.instance_id!r} must not contain '/'")
        if self.role not in ROLES:
            raise MalformedValueError(f"role {self.role!r} is not one of {', '.join(ROLES)}")
        for name in ("http_url", "control_endpoint", "model"):
            _require_str(name, getattr(self, name), allow_empty=True)
        for name in ("engine_id", "segment_name"):
            _require_str(name, getattr(self, name), allow_empty=True)
        if self.kv_layout is not None and not isinstance(self.kv_layout, KVLayoutRecord):
            raise MalformedValueError("kv_layout must be a KVLayoutRecord or None")
        if self.model_shape is not None and not isinstance(self.model_shape, ModelShape):
            raise MalformedValueError("model_shape must be a ModelShape or None")
        for name in ("remote_control", "extra"):
            if not isinstance(getattr(self, name), dict):
                raise MalformedValueError(f"{name} must be an object")

    def __hash__(self) -> int:  # the dict fields are unhashable; equal records share an id
        return hash(self.instance_id)

    def serves(self, role: str | None) -> bool:
        """True when this instance can take `role` work ("both" serves either)."""
        return role is None or self.role == role or self.role == "both"

    def to_json(self) -> bytes:
        body = asdict(self)
        return _dump({"schema": SCHEMA_VERSION, "kind": "instance", **body})

    @classmethod
    def from_json(cls, raw: bytes | str) -> InstanceInfo:
        d = _load(raw, "instance")
        kwargs = {k: d[k] for k in _INSTANCE_FIELDS if k in d}
        missing = [k for k in _INSTANCE_REQUIRED if k not in d]
        if missing:
            raise MalformedValueError(f"instance lacks {', '.join(missing)}")
        layout = kwargs.get("kv_layout")
        kwargs["kv_layout"] = None if layout is None else KVLayoutRecord.from_dict(layout)
        shape = kwargs.get("model_shape")
        kwargs["model_shape"] = None if shape is None else ModelShape.from_dict(shape)
        try:
            return cls(**kwargs)
        except TypeError as e:  # a field of the wrong shape that the dataclass itself rejects
            raise MalformedValueError(str(e)) from e


_INSTANCE_FIELDS = ("instance_id", "role", "http_url", "control_endpoint", "model", "engine_id",
                    "segment_name", "kv_layout", "remote_control", "extra", "model_shape")
_INSTANCE_REQUIRED = _INSTANCE_FIELDS[:5]


def encode_segment(name: str, descriptor: dict[str, Any]) -> bytes:
    _require_str("segment name", name)
    if not isinstance(descriptor, dict):
        raise MalformedValueError(f"segment descriptor must be a dict, got {type(descriptor)}")
    return _dump({"schema": SCHEMA_VERSION, "kind": "segment", "name": name,
                  "descriptor": descriptor})


def decode_segment(raw: bytes | str) -> tuple[str, dict[str, Any]]:
    d = _load(raw, "segment")
    name, desc = d.get("name"), d.get("descriptor")
    if not isinstance(name, str) or not name:
        raise MalformedValueError("segment lacks a name")
    if not isinstance(desc, dict):
        raise MalformedValueError("segment descriptor is not an object")
    return name, desc


def _dump(obj: dict[str, Any]) -> bytes:
    try:
        return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as e:
        raise MalformedValueError(f"value is not JSON-serialisable: {e}") from e


def _load(raw: bytes | str, kind: str) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise MalformedValueError(f"not JSON ({e})") from e
    if not isinstance(d, dict):
        raise MalformedValueError(f"not a JSON object but {type(d).__name__}")
    schema = d.get("schema")
    if not isinstance(schema, int) or isinstance(schema, bool):
        raise MalformedValueError("no integer 'schema' field (not written by mooncake-vllm?)")
    if schema != SCHEMA_VERSION:
        raise MalformedValueError(
            f"schema {schema}, this version reads schema {SCHEMA_VERSION}"
        )
    if d.get("kind") != kind:
        raise MalformedValueError(f"kind {d.get('kind')!r}, expected {kind!r}")
    return d


def _require_int(name: str, v: Any, minimum: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise MalformedValueError(f"{name} must be an integer >= {minimum}, got {v!r}")


def _require_str(name: str, v: Any, allow_empty: bool = False) -> None:
    if not isinstance(v, str) or (not allow_empty and not v):
        raise MalformedValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}"
                                  f"string, got {v!r}")


class MetadataStore(ABC):
    """Segment descriptors and the instance registry of one cluster namespace.

    Lookups (`get_segment`, `get_instance`, `list_instances`) are answered from local memory and
    never block on the network. Writes are kept alive for as long as the store is open and
    removed by `close()`. Callbacks run on the store's own thread, one at a time, in event
    order; they must return quickly.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._callbacks: list[InstanceCallback] = []
        self._learned: dict[str, dict[str, Any]] = {}  # descriptors peers gave us directly
        self._dispatch_lock = threading.RLock()  # held while callbacks run: keeps them ordered

    # -- segments -------------------------------------------------------------------
    @abstractmethod
    def publish_segment(self, name: str, descriptor: dict[str, Any]) -> None:
        """Publish our segment descriptor under `name` (replaces an earlier one)."""

    @abstractmethod
    def unpublish_segment(self, name: str) -> None:
        """Withdraw a segment we published."""

    @abstractmethod
    def get_segment(self, name: str) -> dict[str, Any] | None:
        """A segment descriptor by name: ours, discovered, or learned from a peer; or None."""

    def learn_segment(self, name: str, descriptor: dict[str, Any]) -> None:
        """Remember a peer's descriptor received out of band (e.g. on the control channel);
        `get_segment` falls back to it when the store does not know the name."""
        encode_segment(name, descriptor)  # the same validation as a published one
        self._learned[name] = descriptor

    def last_segment(self, name: str) -> dict[str, Any] | None:
        """`get_segment`, or where the store lost the record (a lapsed lease) its last
        descriptor: for a peer that has just heard from the segment's owner."""
        return self.get_segment(name)

    def forget_segment(self, name: str) -> None:
        """Drop a learned descriptor (e.g. the peer said goodbye)."""
        self._learned.pop(name, None)

    # -- instances ------------------------------------------------------------------
    @abstractmethod
    def register_instance(self, info: InstanceInfo) -> None:
        """Announce an instance (replaces an earlier record with the same id)."""

    @abstractmethod
    def deregister_instance(self, instance_id: str) -> None:
        """Withdraw an instance we registered."""

    @abstractmethod
    def get_instance(self, instance_id: str) -> InstanceInfo | None: ...

    @abstractmethod
    def list_instances(self, role: str | None = None) -> list[InstanceInfo]:
        """Known instances sorted by id; `role` keeps those that serve it ("both" serves all)."""

    # -- store nodes (the KV pool) -------------------------------------------------
    @abstractmethod
    def register_store(self, info: StoreInfo) -> None:
        """Announce a store node (replaces an earlier record with the same name)."""

    @abstractmethod
    def deregister_store(self, name: str) -> None:
        """Withdraw a store node we registered."""

    @abstractmethod
    def list_stores(self) -> list[StoreInfo]:
        """The live store nodes, sorted by name (from the local cache, no network)."""

    def watch_instances(self, callback: InstanceCallback) -> Callable[[], None]:
        """Call `callback("put"|"delete", info)` on every change; returns an unsubscribe.

        The callback first gets a "put" for every instance already known, with no event lost
        or duplicated between that replay and the live stream.
        """
        with self._dispatch_lock:
            self._callbacks.append(callback)
            for info in self.list_instances():
                self._call(callback, "put", info)

        def unsubscribe() -> None:
            with self._dispatch_lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return unsubscribe

    @abstractmethod
    def close(self) -> None:
        """Remove what we published and release resources. Idempotent."""

    # -- helpers for implementations ------------------------------------------------
    def _dispatch(self, events: list[tuple[InstanceEvent, InstanceInfo]]) -> None:
        if not events:
            return
        with self._dispatch_lock:
            for ev, info in events:
                for cb in list(self._callbacks):
                    self._call(cb, ev, info)

    @staticmethod
    def _call(cb: InstanceCallback, ev: InstanceEvent, info: InstanceInfo) -> None:
        try:
            cb(ev, info)
        except Exception:  # a broken watcher must not stop the others or the store
            log.exception("instance watcher %r failed on %s %s", cb, ev, info.instance_id)

    def __enter__(self) -> MetadataStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
