"""The instances the conductor routes to, and the load it tracks for each.

Two sources of load: what the conductor itself has in flight (exact, updated per request) and
what the instance reports on /metrics (includes traffic that bypassed us; refreshed by the
health loop). Routing reads both; neither blocks.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from mooncake_vllm.metadata import ModelShape

from .decode_load import ItlModel
from .kv_events import KVEventFeed
from .prefill_window import PrefillWindow
from .prefix_index import PrefixIndex
from .ttft_model import TtftModel

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode", "both")


@dataclass
class Instance:
    instance_id: str
    url: str
    role: str
    source: str  # "static" | "discovery"
    model: str = ""
    # The connector's opaque description of how a decode worker reaches this prefill instance;
    # from discovery, or from a probe request (static form). None: not known yet.
    remote_control: dict[str, Any] | None = None
    remote_control_from_probe: bool = False
    # The served model's shape: from discovery, or from a prefill answer (static form).
    model_shape: ModelShape | None = None
    models: list[str] = field(default_factory=list)
    healthy: bool = True
    last_error: str = ""
    # Tracked by the conductor.
    inflight: int = 0
    inflight_decode: int = 0
    queued_prefill_tokens: int = 0
    # When the last prefill of ours here ended (time.monotonic()): a decode gap that began
    # before it may have waited for that prefill.
    prefill_quiet_since: float = 0.0
    window: PrefillWindow = field(default_factory=PrefillWindow)
    # Scraped from the instance's /metrics. `running`: requests running there that are not
    # ours (vLLM's count less our decodes in flight at the scrape). Ours are counted exactly
    # as they start and end; the scrape lags by up to a health interval, and taken whole it
    # would keep a finished request of ours running for that long.
    running: float = 0.0
    waiting: float = 0.0
    kv_usage: float = 0.0
    prefix: PrefixIndex = field(default_factory=lambda: PrefixIndex(8192))
    # Where vLLM publishes its KV cache events ("" if nowhere we know), and the feed that keeps
    # `prefix` to what vLLM reports (kv_events.py).
    kv_events_endpoint: str = ""
    kv_events: KVEventFeed | None = None
    # The KV pool's keys for this instance's entries (pool_view.py), when it uses the pool.
    pool_identity: tuple[bytes, bytes] | None = None
    # This instance's own prefill time (seconds = overhead + tokens / rate), and its decode ITL.
    ttft: TtftModel = field(default_factory=TtftModel)
    itl: ItlModel = field(default_factory=ItlModel)
    # Output tokens of the streams relayed from here (a moving average; 0: none seen yet): a
    # prefill here stalls each running decode once, and a decode's mean inter-token latency
    # spreads that stall over its gaps.
    output_tokens: float = 0.0
    # (when, tokens) of the prefills of ours started here lately, newest last.
    prefills_started: deque[tuple[float, int]] = field(
        default_factory=lambda: deque(maxlen=1024))
    warmed_up: bool = False

    def decode_load(self) -> float:
        """Running requests (ours and others'), waiting ones, and KV usage:
        a decode instance whose KV is nearly full will preempt, so usage weighs heavily."""
        return self.decode_batch() + self.waiting + 8.0 * self.kv_usage

    def prefill_free_since(self, t: float) -> bool:
        """Whether no prefill of ours ran here since `t`: a decode gap begun at `t` and ending
        now then measures decode steps alone."""
        return self.queued_prefill_tokens == 0 and t >= self.prefill_quiet_since

    def decode_batch(self) -> float:
        """Requests decoding here now: ours, and others' as last reported."""
        return float(self.inflight_decode) + self.running

    def observe_output(self, tokens: int) -> None:
        if tokens >= 1:
            self.output_tokens = (float(tokens) if self.output_tokens == 0.0
                                  else 0.9 * self.output_tokens + 0.1 * tokens)

    def prefill_tokens_since(self, t: float) -> int:
        """Prompt tokens of the prefills of ours started here at or after `t`."""
        total = 0
        for when, tokens in reversed(self.prefills_started):
            if when < t:
                break
            total += tokens
        return total

    def itl_gaps(self) -> float:
        """The gaps between tokens of a typical decode here (1 until a stream is seen: a
        stall then counts whole)."""
        return max(1.0, self.output_tokens - 1.0)

    def note_reported_load(self, reported: dict[str, float]) -> None:
        """What the instance's /metrics says, less our own requests (see `running`)."""
        for attr, value in reported.items():
            if attr == "running":
                value = max(0.0, value - self.inflight_decode)
            setattr(self, attr, value)

    def forget_cache_state(self) -> None:
        """After a restart or outage the instance's prefix cache and control endpoint may be
        new: drop what we believed about them."""
        self.prefix.clear()
        if self.remote_control_from_probe:
            self.remote_control = None

    def describe(self) -> dict[str, Any]:
        a, b = self.ttft.coefficients()
        return {
            "instance_id": self.instance_id, "url": self.url, "role": self.role,
            "source": self.source, "healthy": self.healthy, "last_error": self.last_error,
            "models": self.models, "inflight": self.inflight,
            "inflight_decode": self.inflight_decode,
            "queued_prefill_tokens": self.queued_prefill_tokens,
            "window_in_flight_tokens": self.window.in_flight,
            "window_waiting": self.window.waiting, "window_waited": self.window.waited,
            "running": self.running,
            "waiting": self.waiting, "kv_usage": self.kv_usage,
            "prefix_blocks": len(self.prefix), "has_remote_control": bool(self.remote_control),
            "kv_events": None if self.kv_events is None else {
                "endpoint": self.kv_events.endpoint, **self.kv_events.stats},
            "ttft_overhead_s": a, "ttft_tokens_per_s": (1.0 / b) if b > 0 else None,
            "itl_base_s": self.itl.base(max(self.decode_batch(), 1.0)),
            "output_tokens": self.output_tokens,
            "warmed_up": self.warmed_up,
            "model_shape": self.model_shape.to_dict() if self.model_shape else None,
        }


class PrefillTicket:
    """One request's share of an instance's queued prefill work: added when the request is
    routed (a request waiting in the prefill window is queued work too), removed exactly once
    when its prefill is over (done, failed or cancelled)."""

    def __init__(self, inst: Instance, tokens: int) -> None:
        self.inst = inst
        self.tokens = tokens
        self.queued_ahead = inst.queued_prefill_tokens
        self._open = True
        self._in_window = False
        inst.queued_prefill_tokens += tokens
        inst.inflight += 1
        if tokens:
            inst.prefills_started.append((time.monotonic(), tokens))

    async def enter_window(self, limit: int) -> None:
        """Wait until the instance's prefill window takes this request (`limit` 0: at once)."""
        if self._open and not self._in_window:
            await self.inst.window.acquire(self.tokens, limit)
            self._in_window = True

    @property
    def work_tokens(self) -> int:
        return self.queued_ahead + self.tokens

    def close(self) -> None:
        if self._open:
            self._open = False
            self.inst.queued_prefill_tokens -= self.tokens
            if self.tokens:
                self.inst.prefill_quiet_since = time.monotonic()
            self.inst.inflight -= 1
            if self._in_window:
                self.inst.window.release(self.tokens)


@contextmanager
def decode_slot(inst: Instance) -> Iterator[None]:
    inst.inflight_decode += 1
    try:
        yield
    finally:
        inst.inflight_decode -= 1


class Registry:
    """Instances by id. Mutated only on the event loop (discovery hops onto it)."""

    def __init__(self, prefix_capacity_blocks: int = 8192,
                 ttft_factory: Callable[[], TtftModel] = TtftModel) -> None:
        self._by_id: dict[str, Instance] = {}
        self._capacity = prefix_capacity_blocks
        self._ttft_factory = ttft_factory
        self.listeners: list[Callable[[str, Instance], None]] = []

    def __iter__(self) -> Iterator[Instance]:
        return iter(list(self._by_id.values()))

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, instance_id: str) -> Instance | None:
        return self._by_id.get(instance_id)

    def upsert(self, instance_id: str, url: str, role: str, source: str, model: str = "",
               remote_control: dict[str, Any] | None = None,
               model_shape: ModelShape | None = None, kv_events: str = "",
               pool_identity: tuple[bytes, bytes] | None = None) -> Instance:
        if role not in ROLES:
            raise ValueError(f"instance {instance_id}: role {role!r} is not one of {ROLES}")
        url = url.rstrip("/")
        old = self._by_id.get(instance_id)
        if old is not None and old.url == url and old.role == role:
            # Same instance re-announced (lease renewal, new control endpoint): keep its state.
            if remote_control:
                old.remote_control, old.remote_control_from_probe = dict(remote_control), False
            old.model = model or old.model
            old.model_shape = model_shape or old.model_shape
            old.kv_events_endpoint = kv_events or old.kv_events_endpoint
            old.pool_identity = pool_identity or old.pool_identity
            for cb in self.listeners:
                cb("put", old)
            return old
        inst = Instance(
            instance_id=instance_id, url=url, role=role, source=source, model=model,
            remote_control=dict(remote_control) if remote_control else None,
            prefix=PrefixIndex(self._capacity), ttft=self._ttft_factory(),
            model_shape=model_shape, kv_events_endpoint=kv_events,
            pool_identity=pool_identity,
        )
        self._by_id[instance_id] = inst
        log.info("instance %s (%s) at %s: added (%s)", instance_id, role, url, source)
        for cb in self.listeners:
            cb("put", inst)
        return inst

    def remove(self, instance_id: str) -> None:
        inst = self._by_id.pop(instance_id, None)
        if inst is not None:
            log.info("instance %s at %s: removed", instance_id, inst.url)
            for cb in self.listeners:
                cb("delete", inst)

    def usable(self, role: str) -> list[Instance]:
        """Healthy instances whose role is exactly `role` ("both" instances serve alone)."""
        return [i for i in self._by_id.values() if i.role == role and i.healthy]
