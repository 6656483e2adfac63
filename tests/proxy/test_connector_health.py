"""The conductor's health round asks each instance's connector workers, not only vLLM's /health:
a decode instance whose transfer engine is dead still answers /health, and would stay in
rotation with every transfer to it failing."""

from __future__ import annotations

import asyncio
import queue

import aiohttp
import pytest
from fake_upstream import FakeInstance

from mooncake_vllm.channel.control_channel import ControlChannel
from mooncake_vllm.connector import messages as m
from mooncake_vllm.proxy.health import HealthChecker
from mooncake_vllm.proxy.metrics import ProxyMetrics
from mooncake_vllm.proxy.upstreams import Registry

TOKEN = "health-test-token-0123456789abcdef"


class FakeWorker:
    """A real control channel answering Pings like a connector worker, with a settable verdict
    (the worker's own health check is the connector's; this stands in for its answer)."""

    def __init__(self) -> None:
        self.unhealthy = ""
        self.pings: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self.channel = ControlChannel("127.0.0.1", 0, self._on_message, lambda: None,
                                      codec=m.CODEC, token=TOKEN)

    def _on_message(self, sender: bytes | str, msg: m.Message) -> None:
        if isinstance(msg, m.Ping) and isinstance(sender, bytes):
            self.channel.send(sender, m.Pong(m.PROTOCOL_VERSION, msg.transfer_id,
                                             not self.unhealthy, self.unhealthy, 0))


@pytest.mark.parametrize("token", [TOKEN, "another-cluster-token-0123456789"])
def test_instance_whose_connector_is_unhealthy_leaves_rotation(token: str) -> None:
    async def run() -> None:
        inst_http = await FakeInstance().start()
        worker = FakeWorker()
        registry = Registry()
        inst = registry.upsert("d1", inst_http.url, "decode", "static",
                               remote_control={"control": [worker.channel.endpoint]})
        async with aiohttp.ClientSession() as session:
            checker = HealthChecker(registry, session, ProxyMetrics(), 60.0, 1.0,
                                    cluster_token=token)
            try:
                await checker.check(inst)
                if token != TOKEN:  # the worker refuses a Ping without this cluster's MAC
                    assert not inst.healthy and "refused the frame" in inst.last_error
                    return
                assert inst.healthy, inst.last_error
                worker.unhealthy = "the engine refused a transfer to itself: connection refused"
                await checker.check(inst)
                assert not inst.healthy
                assert "connector not healthy" in inst.last_error
                assert "the engine refused a transfer to itself" in inst.last_error
                worker.unhealthy = ""
                await checker.check(inst)
                assert inst.healthy
            finally:
                worker.channel.close()
                await inst_http.stop()

    asyncio.run(run())


def test_probed_control_endpoints_that_stop_answering_are_forgotten() -> None:
    """A static prefill instance restarted on new control ports: its probed endpoints are
    forgotten (the next request probes it again), not held against it for ever."""
    async def run() -> None:
        inst_http = await FakeInstance().start()
        worker = FakeWorker()
        registry = Registry()
        inst = registry.upsert("p1", inst_http.url, "prefill", "static")
        inst.remote_control = {"control": [worker.channel.endpoint]}
        inst.remote_control_from_probe = True
        worker.channel.close()  # the instance restarted: nobody answers there any more
        async with aiohttp.ClientSession() as session:
            checker = HealthChecker(registry, session, ProxyMetrics(), 60.0, 0.5,
                                    cluster_token=TOKEN)
            try:
                await checker.check(inst)
                assert inst.healthy and inst.remote_control is None
            finally:
                await inst_http.stop()

    asyncio.run(run())
