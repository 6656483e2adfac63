"""Periodic health checks and load scraping.

Each round, for every instance at once: GET /health (out of rotation on failure, back in when it
answers again), a Ping to each of its workers' control endpoints when they are known (the
connector's own self-check: its threads are alive and its engine accepts a transfer; vLLM's
/health knows nothing of them, and a decode instance whose engine is dead would otherwise stay
in rotation with every transfer to it failing), GET /metrics (running and waiting requests,
KV usage), and GET /v1/models until the served models are known. An instance that comes back
after an outage may have restarted: its believed prefix cache and probed control endpoint are
dropped.

Between rounds an instance can come up unseen (a discovered one registers before its HTTP
server listens, and the first round finds the port closed): a request that finds no instance in
rotation asks for `recheck_down` before it is refused, so it is not turned away for the rest of
a round by an instance that is serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from mooncake_vllm.connector.control import probe_health

from .metrics import ProxyMetrics
from .upstreams import Instance, Registry

log = logging.getLogger(__name__)

_GAUGES = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:kv_cache_usage_perc": "kv_usage",
}


def parse_vllm_load(text: str) -> dict[str, float]:
    """Sum each gauge of interest over its engines (labels). A sample that is not a finite
    count (NaN, infinite, negative) is left out: one would make every prediction for the
    instance infinite or negative."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        attr = _GAUGES.get(family.name)
        if attr is None:
            continue
        vals = [s.value for s in family.samples
                if s.name == family.name and math.isfinite(s.value) and s.value >= 0]
        if attr == "kv_usage":
            out[attr] = max(vals, default=0.0)
        else:
            out[attr] = float(sum(vals))
    return out


def mark_down(inst: Instance, why: str, metrics: ProxyMetrics) -> None:
    if inst.healthy:
        log.warning("instance %s (%s) out of rotation: %s", inst.instance_id, inst.url, why)
    inst.healthy = False
    inst.last_error = why
    metrics.healthy.labels(inst.instance_id, inst.role).set(0)


def mark_up(inst: Instance, metrics: ProxyMetrics) -> None:
    if not inst.healthy:
        log.info("instance %s (%s) back in rotation", inst.instance_id, inst.url)
        inst.forget_cache_state()
    inst.healthy = True
    inst.last_error = ""
    metrics.healthy.labels(inst.instance_id, inst.role).set(1)


class HealthChecker:
    def __init__(self, registry: Registry, session: aiohttp.ClientSession,
                 metrics: ProxyMetrics, interval_s: float, timeout_s: float,
                 cluster_token: str | None = None) -> None:
        self.registry = registry
        self.cluster_token = cluster_token
        self.timeout_s = timeout_s
        self.session = session
        self.metrics = metrics
        self.interval_s = interval_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._task: asyncio.Task[None] | None = None
        self._recheck: asyncio.Task[None] | None = None

    async def check(self, inst: Instance) -> None:
        try:
            async with self.session.get(inst.url + "/health", timeout=self.timeout) as r:
                if r.status != 200:
                    raise RuntimeError(f"/health answered {r.status}")
            why = await self._connector_health(inst)
            if why is not None and inst.remote_control_from_probe:
                # Learned from a probe, so perhaps of a run that has ended (a restart picks
                # new control ports): forget it; the next request probes the instance again.
                log.info("instance %s: its probed control endpoints did not answer (%s); "
                         "probing again at the next request", inst.instance_id, why)
                inst.remote_control = None
            elif why is not None:
                raise RuntimeError(f"connector not healthy: {why}")
            async with self.session.get(inst.url + "/metrics", timeout=self.timeout) as r:
                if r.status == 200:
                    inst.note_reported_load(parse_vllm_load(await r.text()))
            if not inst.models:
                async with self.session.get(inst.url + "/v1/models", timeout=self.timeout) as r:
                    if r.status == 200:
                        data = await r.json()
                        inst.models = [m["id"] for m in data.get("data", []) if "id" in m]
        except (aiohttp.ClientError, asyncio.TimeoutError, RuntimeError, ValueError) as e:
            mark_down(inst, f"health check: {type(e).__name__}: {e}", self.metrics)
            return
        mark_up(inst, self.metrics)

    async def _connector_health(self, inst: Instance) -> str | None:
        controls = (inst.remote_control or {}).get("control")
        if not isinstance(controls, list) or not controls:
            return None  # not known yet (a static prefill before its probe, a plain instance)
        answers = await asyncio.gather(*(
            asyncio.to_thread(probe_health, ep, self.cluster_token, self.timeout_s)
            for ep in controls if isinstance(ep, str)))
        return next((why for why in answers if why is not None), None)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(i) for i in self.registry), return_exceptions=True)

    async def recheck_down(self) -> None:
        """Check every instance out of rotation now (bounded by the health timeout). Requests
        that ask while one recheck runs share it: an outage costs one probe per instance, not
        one per refused request."""
        if self._recheck is None or self._recheck.done():
            self._recheck = asyncio.get_running_loop().create_task(self._check_down())
        await asyncio.shield(self._recheck)

    async def _check_down(self) -> None:
        down = [i for i in self.registry if not i.healthy]
        await asyncio.gather(*(self.check(i) for i in down), return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        for task in (self._task, self._recheck):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
