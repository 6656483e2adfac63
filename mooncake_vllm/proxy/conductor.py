"""The conductor's state: configuration, instances, policy, admission, metrics, HTTP session.

One object, owned by the aiohttp app, started and stopped with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import aiohttp
import zmq.asyncio

from mooncake_vllm.security import is_loopback_host

from .access import conductor_auth
from .admission import Admission
from .config import ProxyConfig
from .discovery import Discovery, add_static
from .health import HealthChecker
from .kv_events import KVEventFeed
from .metrics import ProxyMetrics
from .model_shape import attention_tokens
from .path_shares import LOG_INTERVAL_S, PathShares
from .planner import Prediction, choose, options
from .pool_view import PoolView
from .prompt import PromptHasher, PromptKey
from .request_id import RequestIds
from .routing import Policy, PrefillChoice, assess, make_policy
from .ttft_model import TtftModel
from .upstreams import Instance, Registry
from .warmup import Warmups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    prefill: PrefillChoice  # the instance that prefills: P, or D itself, or a "both" instance
    decode: Instance | None  # None: served alone, without disaggregation
    # Pipelined prefill: P computes only the prompt's first this many tokens (0: all of it).
    pipeline_tokens: int = 0
    path: str = "alone"  # "disaggregated" | "local" | "pipelined" | "alone" (a "both")
    predicted_ttft_s: float = 0.0
    predicted_itl_s: float | None = None  # None: no decode instance in the plan
    rejected_for: str = ""  # "ttft" | "itl": admission refuses the request
    idle_ttft_s: float = 0.0  # the prompt's compute alone: TTFT on an idle instance


class Conductor:
    def __init__(self, config: ProxyConfig, policy: Policy | None = None) -> None:
        self.config = config.validate()
        self.metrics = ProxyMetrics()
        self.request_ids = RequestIds()
        self.path_shares = PathShares(self.metrics)
        self._shares_log: asyncio.Task[None] | None = None
        self.registry = Registry(
            config.prefix_capacity_blocks,
            ttft_factory=lambda: TtftModel(config.prior_overhead_s, config.prior_tokens_per_s),
        )
        self.registry.listeners.append(self._on_instance)
        self.policy = policy or make_policy(config.policy)
        self.admission = Admission(config.slo_ttft_s, self.metrics, config.slo_itl_s)
        self.hasher = PromptHasher(config.tokenizer, config.block_tokens, config.chars_per_block)
        self.session: aiohttp.ClientSession | None = None  # client requests' upstream halves
        self.checks: aiohttp.ClientSession | None = None  # health checks and load scraping
        self.health: HealthChecker | None = None
        self.discovery: Discovery | None = None
        self.pool_view: PoolView | None = None  # with discovery: the KV pool's members
        self.probe_locks: dict[str, asyncio.Lock] = {}
        # Measured per P-D pair (EWMA): D's first token after P's answer (the handoff).
        self.handoff_s: dict[tuple[str, str], float] = {}
        self.warmups: Warmups | None = None
        self.zmq_context: zmq.asyncio.Context | None = None  # made for the first KV-events feed
        self._feeds_stopping: set[asyncio.Task[None]] = set()

    def _on_instance(self, event: str, inst: Instance) -> None:
        self._sync_kv_events(inst, gone=event != "put")
        if event == "put":
            self.metrics.healthy.labels(inst.instance_id, inst.role).set(1 if inst.healthy else 0)
        else:
            self.metrics.healthy.labels(inst.instance_id, inst.role).set(0)
            self.probe_locks.pop(inst.instance_id, None)
            for pair in [k for k in self.handoff_s if inst.instance_id in k]:
                del self.handoff_s[pair]

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
        self._start_kv_event_feeds()
        if cfg.metadata_server:
            self.discovery = Discovery(self.registry, cfg.metadata_server, cfg.namespace)
            # open_metadata blocks (bounded by its own connect deadline): keep the loop free.
            try:
                await asyncio.to_thread(self.discovery.start, asyncio.get_running_loop())
            except BaseException:
                await self.session.close()  # stop() will not run for a failed start
                await self.checks.close()
                raise
            self.pool_view = PoolView(self.discovery.store, cfg.cluster_token)
        self.health = HealthChecker(self.registry, self.checks, self.metrics,
                                    cfg.health_interval_s, cfg.health_timeout_s,
                                    cluster_token=cfg.cluster_token)
        self.health.start()
        self.warmups = Warmups(self.registry, self.checks, cfg.warmup_tokens,
                               cfg.health_interval_s, cfg.prefill_timeout_s, self.metrics)
        self.warmups.start()
        self._shares_log = asyncio.create_task(self._log_path_shares())
        log.info("conductor: policy %s, prefix hashing by %s, SLOs TTFT %s ITL %s, transfer "
                 "parameters %s, operator views %s", self.policy.name, self.hasher.mode,
                 cfg.slo_ttft_s, cfg.slo_itl_s,
                 "signed" if cfg.cluster_token else "unsigned (no cluster token)",
                 "behind the admin token" if cfg.admin_token else "for loopback clients only")
        if not cfg.cluster_token and not is_loopback_host(cfg.host):
            log.warning("conductor listens on %s without a cluster token: the transfer "
                        "parameters it writes are unsigned, and instances with a token will "
                        "refuse them", cfg.host)

    def _start_kv_event_feeds(self) -> None:
        by_url = {i.url: i for i in self.registry}
        for url, endpoint in self.config.kv_events:
            inst = by_url[url.rstrip("/")]
            inst.kv_events_endpoint = endpoint
            self._sync_kv_events(inst)

    def _sync_kv_events(self, inst: Instance, gone: bool = False) -> None:
        """A feed per instance that publishes KV cache events, at the endpoint it gives now
        (event loop thread; before start() there is no loop yet and nothing to feed)."""
        feed = inst.kv_events
        wanted = "" if gone else inst.kv_events_endpoint
        if feed is not None and feed.endpoint == wanted:
            return
        if feed is not None:
            inst.kv_events = None
            task = asyncio.get_running_loop().create_task(feed.stop())
            self._feeds_stopping.add(task)  # referenced until done (asyncio keeps weak refs)
            task.add_done_callback(self._feeds_stopping.discard)
        if wanted and self.session is not None:  # started
            inst.kv_events = KVEventFeed(wanted, inst.prefix, self.config.block_tokens,
                                         name=inst.instance_id)
            if self.zmq_context is None:
                self.zmq_context = zmq.asyncio.Context()
            inst.kv_events.start(self.zmq_context)

    async def _log_path_shares(self) -> None:
        while True:
            await asyncio.sleep(LOG_INTERVAL_S)
            line = self.path_shares.summary_if_changed()
            if line is not None:
                log.info("%s", line)

    async def stop(self) -> None:
        if self._shares_log is not None:
            self._shares_log.cancel()
        for inst in self.registry:
            if inst.kv_events is not None:
                await inst.kv_events.stop()
                inst.kv_events = None
        if self.zmq_context is not None:
            self.zmq_context.destroy(linger=0)  # closes any socket a feed still holds
        if self.warmups is not None:
            await self.warmups.stop()
        if self.health is not None:
            await self.health.stop()
        if self.pool_view is not None:
            await asyncio.to_thread(self.pool_view.close)
        if self.discovery is not None:
            await asyncio.to_thread(self.discovery.close)
        for session in (self.session, self.checks):
            if session is not None:
                await session.close()

    async def with_pool(self, key: PromptKey) -> PromptKey:
        """`key` with the tokens of its prefix the KV pool holds, per pool identity of the
        instances that could prefill it (exact token ids needed; bounded by the view)."""
        if self.pool_view is None or key.token_ids is None or not self.pool_view.has_stores():
            return key
        shapes = {i.pool_identity: i.model_shape for i in self.registry
                  if i.healthy and i.pool_identity is not None and i.model_shape is not None}
        if not shapes:
            return key
        held = []
        for identity, shape in shapes.items():
            tokens = await asyncio.to_thread(self.pool_view.held_tokens, identity,
                                             shape.block_size, key.token_ids)
            held.append((identity, tokens))
        return dataclasses.replace(key, pool_tokens=tuple(held))

    def route(self, key: PromptKey, exclude: set[str], pipelinable: bool = False,
              one_sequence: bool = True, policy: Policy | None = None,
              on_decode_alone: bool = False) -> Route | None:
        """Disaggregated, local or pipelined by plan (planner.py) when prefill and decode
        instances are up; else a "both" instance alone. A request for several sequences (n > 1,
        best_of, several prompts) is served by a decode instance alone: one transfer id carries
        the KV of one sequence. `policy`: another than the conductor's (a preview, which
        leaves the conductor's turn where it is). `on_decode_alone`: prefilled on a decode
        instance itself, whatever the plan (a retry after its KV load failed)."""
        policy = policy or self.policy

        def up(role: str) -> list[Instance]:
            return [i for i in self.registry.usable(role) if i.instance_id not in exclude]

        prefill, decode = up("prefill"), up("decode")
        if on_decode_alone and decode:
            d = policy.choose_decode(decode)
            local = assess(d, key)
            return Route(local, None, path="local", predicted_ttft_s=local.predicted_ttft_s,
                         predicted_itl_s=d.itl.base(d.decode_batch() + 1),
                         idle_ttft_s=d.ttft.predict(local.new_tokens))
        if prefill and decode:
            return self._plan(policy, policy.choose_decode(decode), prefill, key, pipelinable,
                              one_sequence)
        both = up("both")
        if both:
            choice = policy.choose_prefill(both, key)
            return Route(choice, None, predicted_ttft_s=choice.predicted_ttft_s,
                         idle_ttft_s=choice.instance.ttft.predict(choice.new_tokens))
        return None

    def _plan(self, policy: Policy, d: Instance, prefill: list[Instance], key: PromptKey,
              pipelinable: bool, one_sequence: bool) -> Route:
        cfg = self.config
        local = assess(d, key)
        base_itl = d.itl.base(d.decode_batch() + 1)
        forced_local = (cfg.local_prefill_max_tokens is not None
                        and key.num_tokens <= cfg.local_prefill_max_tokens)
        if forced_local or not one_sequence:
            return Route(local, None, path="local", predicted_ttft_s=local.predicted_ttft_s,
                         predicted_itl_s=base_itl,
                         idle_ttft_s=d.ttft.predict(local.new_tokens))
        p = policy.choose_prefill(prefill, key)
        # D's prefill speed is taken to be P's (the same model on, as a rule, the same
        # hardware): D's own samples come from few prompts, mostly tiny local ones, and two
        # noisy overheads would decide between local and disaggregated instead of the handoff.
        speed = p.instance.ttft
        local = assess(d, key, speed)
        head = self.pipeline_head(key, p.instance) if pipelinable else 0
        head_choice = assess(p.instance, key.head(head)) if head else None
        pair = (p.instance.instance_id, d.instance_id)
        # What a prefill on D costs its running decodes per token: the slower of the two
        # speeds (D's own, from few samples, may be the truer one there: D also receives KV).
        spt_d = max(speed.coefficients()[1], d.ttft.coefficients()[1])
        p_head_s = head_choice.predicted_ttft_s if head_choice else 0.0
        # Decodes D runs now, and those on their way: requests waiting for a prefill window
        # decode next (on a D of their own where there are several: the count errs towards
        # keeping prefill off D).
        coming = sum(i.window.waiting for i in prefill)
        prediction = Prediction(
            p_prefill_s=p.predicted_ttft_s,
            handoff_s=self.handoff_s.get(pair, cfg.prior_handoff_s),
            d_prefill_s=local.predicted_ttft_s, d_base_itl_s=base_itl,
            d_running=d.decode_batch() + coming, d_seconds_per_token=spt_d,
            prompt_tokens=key.num_tokens, pipeline_tokens=head,
            p_head_prefill_s=p_head_s,
            d_tail_prefill_s=speed.predict(d.queued_prefill_tokens + key.num_tokens - head),
            # Ungated, D's step waits for the head from its start; gated, D starts its part
            # once P is computing the head's last chunk.
            pipeline_hold_s=0.0 if cfg.pipeline_gate else p_head_s,
            d_queued_prefill_s=spt_d * d.queued_prefill_tokens,
            d_prefill_share=spt_d * d.prefill_tokens_since(time.monotonic() - SHARE_WINDOW_S)
            / SHARE_WINDOW_S,
            d_itl_gaps=d.itl_gaps())
        opts = options(prediction, local=cfg.local_prefill_max_tokens is None
                       or cfg.local_prefill_when_faster, pipelined=head > 0)
        if head and cfg.pipeline_prefill_min_tokens:  # the override: pipelined when it can be
            opts = [o for o in opts if o.path == "pipelined"]
        # Each allowed path with no queue ahead: what this request costs on an idle pair.
        idle_of = {"disaggregated": speed.predict(p.new_tokens) + prediction.handoff_s,
                   "local": speed.predict(local.new_tokens),
                   "pipelined": speed.predict(max(head, key.num_tokens - head))
                   + prediction.handoff_s}
        idle_ttft = min(idle_of[o.path] for o in opts)
        plan = choose(opts, cfg.slo_ttft_s, cfg.slo_itl_s, idle_ttft, d.itl.base(1))
        log.debug("plan for %d tokens: %s -> %s", key.num_tokens, opts, plan)
        # Refused: the route admission sees (and serves, if the evidence does not bear the
        # refusal out) is the path the plan judged, within the ITL SLO where one is.
        chosen = plan.option or plan.judged or min(opts, key=lambda o: o.predicted_ttft_s)
        route_of = {
            "disaggregated": lambda: Route(p, d),
            "local": lambda: Route(local, None),
            "pipelined": lambda: Route(head_choice, d, pipeline_tokens=head),  # type: ignore
        }[chosen.path]()
        return Route(route_of.prefill, route_of.decode, route_of.pipeline_tokens,
                     path=chosen.path, predicted_ttft_s=chosen.predicted_ttft_s,
                     predicted_itl_s=chosen.predicted_itl_s, rejected_for=plan.rejected_for,
                     idle_ttft_s=idle_ttft)

    def would_pipeline(self, key: PromptKey) -> bool:
        """Whether a text prompt of this estimated length would be pipelined if its token ids
        were known (then they are worth a /tokenize round trip)."""
        if key.token_ids is not None or self.config.pipeline_prefill_min_tokens == 0:
            return False
        estimate = PromptKey(key.block_hashes, key.num_tokens, self.config.block_tokens,
                             (0,) * key.num_tokens)
        route = self.route(estimate, set(), pipelinable=True, policy=self.policy.preview())
        return route is not None and route.path == "pipelined"

    def attention_tokens(self, p: Instance) -> float:
        """C for the pipelined cut: the override, else from P's published model shape, else 0
        (the tokens split evenly)."""
        if self.config.pipeline_attention_tokens is not None:
            return float(self.config.pipeline_attention_tokens)
        return attention_tokens(p.model_shape) if p.model_shape else 0.0

    def pipeline_head(self, key: PromptKey, p: Instance) -> int:
        """How many leading tokens P computes when this prompt is prefilled in a pipeline:
        P's share in whole blocks, leaving D at least one token; 0 when it cannot be."""
        cfg = self.config
        if (cfg.pipeline_prefill_min_tokens == 0 or key.token_ids is None
                or key.num_tokens < (cfg.pipeline_prefill_min_tokens or 0)):
            return 0
        bs = p.model_shape.block_size if p.model_shape else key.tokens_per_block
        head = round(pipeline_cut(key.num_tokens, cfg.pipeline_prefill_share,
                                  self.attention_tokens(p)) / bs) * bs
        return max(0, min(head, (key.num_tokens - 1) // bs * bs))

    def window_limit(self, p: Instance) -> int:
        """The prefill window of P (0: off): the override, else the tokens P prefills in the
        target time at its measured speed."""
        if self.config.prefill_window_tokens is not None:
            return int(self.config.prefill_window_tokens)
        seconds_per_token = p.ttft.coefficients()[1]
        if seconds_per_token <= 0:
            return 0
        return max(1, int(self.config.prefill_window_target_s / seconds_per_token))

    def observe_handoff(self, p: Instance, d: Instance, seconds: float) -> None:
        """One measurement of a P-D pair's handoff (EWMA, never < 0)."""
        pair = (p.instance_id, d.instance_id)
        sample = max(seconds, 0.0)
        old = self.handoff_s.get(pair)
        self.handoff_s[pair] = sample if old is None else 0.8 * old + 0.2 * sample


# Over how many seconds D's prefill share is measured: a few decodes' lifetimes.
SHARE_WINDOW_S = 2.0


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
