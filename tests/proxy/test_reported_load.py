"""The load an instance reports on /metrics lags by up to a health interval; the conductor's own
requests are known exactly. A finished request of ours must not count as running until the next
scrape: the planner would keep prefill off an idle decode instance (its running decodes would
seem to pay for it) for up to two seconds after every request."""

from __future__ import annotations

import asyncio

import aiohttp
from fake_upstream import FakeInstance

from mooncake_vllm.proxy.health import HealthChecker
from mooncake_vllm.proxy.metrics import ProxyMetrics
from mooncake_vllm.proxy.upstreams import Registry, decode_slot


def _running(n: int | str) -> str:
    return ("# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0",model_name="m"}} {n}\n')


def test_a_finished_request_of_ours_is_not_running_until_the_next_scrape() -> None:
    async def run() -> None:
        http = await FakeInstance().start()
        registry = Registry()
        d = registry.upsert("d1", http.url, "decode", "static")
        async with aiohttp.ClientSession() as session:
            checker = HealthChecker(registry, session, ProxyMetrics(), 60.0, 2.0)
            try:
                with decode_slot(d):  # one request of ours decodes there...
                    http.metrics_text = _running(1)  # ...and is what vLLM reports
                    await checker.check(d)
                    assert d.decode_batch() == 1.0
                # Ours has ended; the scrape still says 1 until the next round.
                assert d.decode_batch() == 0.0, d.describe()
                # Requests sent by others (not through this conductor) do count.
                with decode_slot(d):
                    http.metrics_text = _running(3)
                    await checker.check(d)
                    assert d.decode_batch() == 3.0
                assert d.decode_batch() == 2.0
                # A count that is no count is left out, not taken.
                for bad in ("NaN", "+Inf", "-5"):
                    http.metrics_text = _running(bad)
                    await checker.check(d)
                    assert d.decode_batch() == 0.0, (bad, d.describe())
            finally:
                await http.stop()

    asyncio.run(run())
