"""A short warm-up of each instance, so that the first requests are planned from measured
speeds rather than the prior: when an instance is first seen healthy (its model known), the
conductor sends it four plain one-token completions: one that is not timed (a fresh engine's
first request pays one-off costs), two of a single token (the faster one: the overhead) and
one of `warmup_tokens` ids drawn at random (the rate; an instance that another conductor has
warmed up would answer a fixed prompt from its prefix cache). These become the prior of the
instance's TTFT model, which its later prefills refine. A failure is logged and counted; the
instance then keeps the configured prior and learns from its requests.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import Any

import aiohttp

from .metrics import ProxyMetrics
from .ttft_model import TtftModel
from .upstreams import Instance, Registry

log = logging.getLogger(__name__)

# Ids past the special tokens and within any vocabulary served today. The long prompt is drawn
# at random: an instance another conductor has warmed up would otherwise answer it from its
# prefix cache, and the rate measured would be the cache's.
FIRST_ID, LAST_ID = 100, 1000


async def warm_up(session: aiohttp.ClientSession, inst: Instance, tokens: int,
                  timeout_s: float) -> None:
    model = inst.models[0] if inst.models else (inst.model or None)
    draw = random.Random()
    prompts = [[FIRST_ID], [FIRST_ID + 1], [FIRST_ID + 2],
               [draw.randrange(FIRST_ID, LAST_ID) for _ in range(tokens)]]
    took: list[float] = []
    for ids in prompts:
        body: dict[str, Any] = {"prompt": ids, "max_tokens": 1, "stream": False}
        if model:
            body["model"] = model
        started = time.monotonic()
        async with session.post(inst.url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            await r.read()
            if r.status != 200:
                raise RuntimeError(f"a warm-up completion answered {r.status}")
        took.append(time.monotonic() - started)
    overhead, full = min(took[1:3]), took[3]
    if full > overhead:
        inst.ttft = TtftModel(prior_overhead_s=overhead,
                              prior_tokens_per_s=(tokens - 1) / (full - overhead))


class Warmups:
    """Warms each healthy instance up once, in the background; a plain class the conductor
    owns (started and stopped with it)."""

    def __init__(self, registry: Registry, session: aiohttp.ClientSession, tokens: int,
                 interval_s: float, timeout_s: float, metrics: ProxyMetrics) -> None:
        self.registry, self.session, self.tokens = registry, session, tokens
        self.interval_s, self.timeout_s, self.metrics = interval_s, timeout_s, metrics
        self._running: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.tokens > 0:
            self._loop = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            for inst in self.registry:
                if (inst.healthy and inst.models and not inst.warmed_up
                        and inst.instance_id not in self._running):
                    self._running[inst.instance_id] = asyncio.get_running_loop().create_task(
                        self._one(inst))
            await asyncio.sleep(self.interval_s)

    async def _one(self, inst: Instance) -> None:
        try:
            await warm_up(self.session, inst, self.tokens, self.timeout_s)
            self.metrics.warmups.labels("ok").inc()
        except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError) as e:
            log.warning("instance %s: warm-up failed (%s); its speed is learned from its "
                        "first requests", inst.instance_id, e)
            self.metrics.warmups.labels("failed").inc()
        finally:
            inst.warmed_up = True

    async def stop(self) -> None:
        tasks = [t for t in (self._loop, *self._running.values()) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
