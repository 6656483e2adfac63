"""Routing policies: which prefill (or "both") instance and which decode instance serve a request.

A policy is a small class with `choose_prefill` and `choose_decode`. Every choice carries the
predicted TTFT on the chosen prefill instance (what admission control judges), whatever the
policy, so that policies can be compared on equal terms.

- `RoundRobin`: the baseline that ignores everything.
- `LeastLoaded`: prefill by queued prefill tokens, decode by load.
- `CacheAware` (Mooncake's conductor): for every prefill candidate, the tokens it would have to
  compute are the queued prefill tokens ahead plus the prompt minus the prefix it holds (its
  own cache, or the cluster KV pool's, which every candidate can fetch); the instance's own
  fitted TTFT model turns that into seconds, plus the time to fetch what comes from the pool;
  the smallest predicted TTFT wins. A long cached prefix thus attracts a request until the
  queue there costs more than recomputing (or fetching) the prefix elsewhere. Decode by load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .pool_view import FETCH_BYTES_PER_S
from .prompt import PromptKey
from .ttft_model import TtftModel
from .upstreams import Instance


@dataclass(frozen=True)
class PrefillChoice:
    instance: Instance
    cached_tokens: int  # prefix the instance is believed to hold
    new_tokens: int  # tokens it must compute for this prompt
    predicted_ttft_s: float


def assess(inst: Instance, key: PromptKey, model: TtftModel | None = None) -> PrefillChoice:
    """What `inst` would compute for this prompt and when its first token would come, by its
    own TTFT model unless another (`model`) is given."""
    local = min(inst.prefix.match(key.block_hashes) * key.tokens_per_block, key.num_tokens)
    pooled = min(key.pool_tokens_for(inst.pool_identity), key.num_tokens)
    cached = max(local, pooled)
    new = max(key.num_tokens - cached, 1)  # the last token is always computed
    predicted = (model or inst.ttft).predict(inst.queued_prefill_tokens + new)
    if pooled > local:
        predicted += pool_fetch_s(inst, pooled - local)
    return PrefillChoice(inst, cached, new, predicted)


def pool_fetch_s(inst: Instance, tokens: int) -> float:
    """Time to fetch `tokens` of KV from the pool: their bytes (from the published model
    shape) at pool_view.FETCH_BYTES_PER_S."""
    shape = inst.model_shape
    if shape is None:
        return 0.0
    width = 1 if shape.dtype.startswith(("float8", "int8")) else 2 if "16" in shape.dtype else 4
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * width
    return tokens * per_token / FETCH_BYTES_PER_S


class Policy:
    name = "base"

    def preview(self) -> Policy:
        """A policy that makes the choices this one would make next, without advancing this
        one's state: planning "what would happen" must not move a request's turn."""
        return self

    def choose_prefill(self, candidates: Sequence[Instance], key: PromptKey) -> PrefillChoice:
        raise NotImplementedError

    def choose_decode(self, candidates: Sequence[Instance]) -> Instance:
        return min(candidates, key=lambda i: (i.decode_load(), i.instance_id))


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, next_p: int = 0, next_d: int = 0) -> None:
        self._p, self._d = next_p, next_d

    def preview(self) -> Policy:
        return RoundRobin(self._p, self._d)

    @staticmethod
    def _pick(candidates: Sequence[Instance], turn: int) -> Instance:
        ordered = sorted(candidates, key=lambda i: i.instance_id)
        return ordered[turn % len(ordered)]

    def choose_prefill(self, candidates: Sequence[Instance], key: PromptKey) -> PrefillChoice:
        self._p += 1
        return assess(self._pick(candidates, self._p - 1), key)

    def choose_decode(self, candidates: Sequence[Instance]) -> Instance:
        self._d += 1
        return self._pick(candidates, self._d - 1)


class LeastLoaded(Policy):
    name = "least_loaded"

    def choose_prefill(self, candidates: Sequence[Instance], key: PromptKey) -> PrefillChoice:
        inst = min(candidates, key=lambda i: (i.queued_prefill_tokens, i.inflight,
                                              i.running + i.waiting, i.instance_id))
        return assess(inst, key)


class CacheAware(Policy):
    name = "cache_aware"

    def choose_prefill(self, candidates: Sequence[Instance], key: PromptKey) -> PrefillChoice:
        options = [assess(i, key) for i in candidates]
        return min(options, key=lambda c: (c.predicted_ttft_s, c.instance.queued_prefill_tokens,
                                           c.instance.instance_id))


POLICY_CLASSES: dict[str, type[Policy]] = {
    p.name: p for p in (RoundRobin, LeastLoaded, CacheAware)
}


def make_policy(name: str) -> Policy:
    try:
        return POLICY_CLASSES[name]()
    except KeyError:
        raise ValueError(f"routing policy {name!r}: expected one of "
                         f"{', '.join(POLICY_CLASSES)}") from None
