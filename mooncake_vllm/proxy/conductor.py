"""The conductor's state: configuration, instances, policy, admission, metrics, HTTP session.

One object, owned by the aiohttp app, started and stopped with it.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass

import aiohttp

from mooncake_vllm.security import is_loopback_host

from .access import conductor_auth
from .admission import Admission
from .config import ProxyConfig
from .discovery import Discovery, add_static
from .health import HealthChecker
from .metrics import ProxyMetrics
from .prompt import PromptHasher, PromptKey
from .routing import Policy, PrefillChoice, assess, make_policy
from .ttft_model import TtftModel
from .upstreams import Instance, Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    prefill: PrefillChoice  # the prefill instance, or the "both" instance that serves alone
    decode: Instance | None  # None: served alone, without disaggregation
    # Pipelined prefill: P computes only the prompt's first this many tokens (0: all of it).
    pipeline_tokens: int = 0


class Conductor:
    def __init__(self, config: ProxyConfig, policy: Policy | None = None) -> None:
        self.config = config.validate()
        self.metrics = ProxyMetrics()
        self.registry = Registry(
            config.prefix_capacity_blocks,
            ttft_factory=lambda: TtftModel(config.prior_overhead_s, config.prior_tokens_per_s),
        )
        self.registry.listeners.append(self._on_instance)
        self.policy = policy or make_policy(config.policy)
        self.admission = Admission(config.slo_ttft_s, self.metrics)
        self.hasher = PromptHasher(config.tokenizer, config.block_tokens, config.chars_per_block)
        self.session: aiohttp.ClientSession | None = None  # client requests' upstream halves
        self.checks: aiohttp.ClientSession | None = None  # health checks and load scraping
        self.health: HealthChecker | None = None
        self.discovery: Discovery | None = None
        self.probe_locks: dict[str, asyncio.Lock] = {}

    def _on_instance(self, event: str, inst: Instance) -> None:
        if event == "put":
            self.metrics.healthy.labels(inst.instance_id, inst.role).set(1 if inst.healthy else 0)
        else:
            self.metrics.healthy.labels(inst.instance_id, inst.role).set(0)
            self.probe_locks.pop(inst.instance_id, None)

    async def start(self) -> None:
        cfg = self.config
        # A client request holds at most one connection to an instance for its lifetime, and
        # two in all (its P and D halves); the margin is for probes and /v1/models. The pool
        # thus never makes an admitted request wait, and still bounds what the conductor opens.
        n = cfg.max_concurrent_requests
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=2 * n + 64, limit_per_host=n + 8),
            timeout=aiohttp.ClientTimeout(total=None, connect=cfg.connect_timeout_s),
        )
        # Health checks have a pool of their own: a pool full of client requests must not make
        # a healthy instance miss its check and leave rotation.
        self.checks = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, limit_per_host=4),
            headers=conductor_auth(cfg.upstream_api_key),
        )
        add_static(self.registry, "prefill", cfg.prefill_urls)
        add_static(self.registry, "decode", cfg.decode_urls)
        add_static(self.registry, "both", cfg.both_urls)
        if cfg.metadata_server:
            self.discovery = Discovery(self.registry, cfg.metadata_server, cfg.namespace)
            # open_metadata blocks (bounded by its own connect deadline): keep the loop free.
            try:
                await asyncio.to_thread(self.discovery.start, asyncio.get_running_loop())
            except BaseException:
                await self.session.close()  # stop() will not run for a failed start
                await self.checks.close()
                raise
        self.health = HealthChecker(self.registry, self.checks, self.metrics,
                                    cfg.health_interval_s, cfg.health_timeout_s,
                                    cluster_token=cfg.cluster_token)
        self.health.start()
        log.info("conductor: policy %s, prefix hashing by %s, SLO %s, transfer parameters %s, "
                 "operator views %s", self.policy.name, self.hasher.mode, cfg.slo_ttft_s,
                 "signed" if cfg.cluster_token else "unsigned (no cluster token)",
                 "behind the admin token" if cfg.admin_token else "for loopback clients only")
        if not cfg.cluster_token and not is_loopback_host(cfg.host):
            log.warning("conductor listens on %s without a cluster token: the transfer "
                        "parameters it writes are unsigned, and instances with a token will "
                        "refuse them", cfg.host)

    async def stop(self) -> None:
        if self.health is not None:
            await self.health.stop()
        if self.discovery is not None:
            await asyncio.to_thread(self.discovery.close)
        for session in (self.session, self.checks):
            if session is not None:
                await session.close()

    def route(self, key: PromptKey, exclude: set[str], pipelinable: bool = False,
              one_sequence: bool = True) -> Route | None:
        """Disaggregated when prefill and decode instances are up (a short prompt: the decode
        instance alone; a long one, if `pipelinable`: P and D in a pipeline); else a "both"
        instance alone. A request for several sequences (n > 1, best_of, several prompts) is
        served by a decode instance alone: one transfer id carries the KV of one sequence."""
        def up(role: str) -> list[Instance]:
            return [i for i in self.registry.usable(role) if i.instance_id not in exclude]

        prefill, decode = up("prefill"), up("decode")
        if prefill and decode:
            d = self.policy.choose_decode(decode)
            if key.num_tokens <= self.config.local_prefill_max_tokens or not one_sequence:
                return Route(assess(d, key), None)
            p = self.policy.choose_prefill(prefill, key)
            head = self.pipeline_head(key) if pipelinable else 0
            if head:
                return Route(assess(p.instance, key.head(head)), d, pipeline_tokens=head)
            if self.config.local_prefill_when_faster:
                # D's prefill speed is taken to be P's (the same model on, as a rule, the same
                # hardware): D's own TTFT samples come mostly from tiny local prompts and would
                # not tell its rate for a long one.
                local = assess(d, key, p.instance.ttft)
                if local.predicted_ttft_s < p.predicted_ttft_s:
                    return Route(local, None)
            return Route(p, d)
        both = up("both")
        if both:
            return Route(self.policy.choose_prefill(both, key), None)
        return None

    def pipeline_head(self, key: PromptKey) -> int:
        """How many leading tokens P computes when this prompt is prefilled in a pipeline:
        P's share in whole blocks, leaving D at least one token; 0 when not pipelined."""
        cfg = self.config
        if (not cfg.pipeline_prefill_min_tokens or key.token_ids is None
                or key.num_tokens < cfg.pipeline_prefill_min_tokens):
            return 0
        bs = key.tokens_per_block
        head = round(pipeline_cut(key.num_tokens, cfg.pipeline_prefill_share,
                                  cfg.pipeline_attention_tokens) / bs) * bs
        return max(0, min(head, (key.num_tokens - 1) // bs * bs))


def pipeline_cut(num_tokens: int, share: float, attention_tokens: float) -> float:
    """Where to cut a prompt so that the head holds `share` of its prefill compute.

    Token i costs 1 + i / C (C = `attention_tokens`: its layer's fixed work, plus attention
    over the i tokens before it), so the first n tokens cost n + n^2 / 2C; solved for
    n + n^2 / 2C = share * cost(num_tokens). C = 0: a plain share of the tokens."""
    if attention_tokens <= 0:
        return num_tokens * share
    c = attention_tokens
    target = share * (num_tokens + num_tokens * num_tokens / (2 * c))
    return c * (math.sqrt(1 + 2 * target / c) - 1)
