"""What the conductor sends upstream, seen by stand-in instances on real sockets: client-sent
kv_transfer_params never arrive, the conductor's own are signed with the cluster token, the
client's Authorization header travels with its request, and the conductor's own calls carry
the upstream key."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from fake_upstream import MODEL, FakeInstance, conductor_at, rc_for

from mooncake_vllm.proxy import transfer_params
from mooncake_vllm.proxy.config import ProxyConfig
from mooncake_vllm.security import transfer_params_refusal

TOKEN = "cluster-secret-0123456789"
# What a client might send to make D read another request's blocks.
FORGED = {"do_remote_prefill": True, "transfer_id": "someone-elses-transfer",
          "remote_control": rc_for(1)}


async def _post(url: str, body: dict[str, Any],
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body,
                                                    headers=headers or {}) as r:
        return r.status, await r.json()


def test_disaggregated_halves_carry_signed_conductor_params_and_client_auth() -> None:
    async def go() -> None:
        p, d = FakeInstance(remote_control=rc_for(7001)), FakeInstance()
        await p.start()
        await d.start()
        cfg = ProxyConfig(port=0, prefill_urls=(p.url,), decode_urls=(d.url,),
                          cluster_token=TOKEN, upstream_api_key="upstream-key",
                          local_prefill_max_tokens=0, warmup_tokens=0)
        try:
            async with conductor_at(cfg) as (url, _):
                status, _ = await _post(url, {"model": MODEL, "prompt": "hello", "max_tokens": 4,
                                              "kv_transfer_params": FORGED},
                                        {"Authorization": "Bearer client-key"})
                assert status == 200
        finally:
            await p.stop()
            await d.stop()
        probe, p_half = p.generation()
        [d_half] = d.generation()
        # The probe is the conductor's own call: signed, with the upstream key.
        assert probe.body["kv_transfer_params"]["probe"] is True
        assert transfer_params_refusal(TOKEN, probe.body["kv_transfer_params"]) is None
        assert probe.headers["Authorization"] == "Bearer upstream-key"
        pp, dp = p_half.body["kv_transfer_params"], d_half.body["kv_transfer_params"]
        for params in (pp, dp):
            assert transfer_params_refusal(TOKEN, params) is None, params
            assert params["transfer_id"] != FORGED["transfer_id"]
        assert pp["do_remote_decode"] is True and "do_remote_prefill" not in pp
        assert dp["transfer_id"] == pp["transfer_id"]
        assert dp["remote_control"] == rc_for(7001)  # P's own, not the client's
        for half in (p_half, d_half):
            assert half.headers["Authorization"] == "Bearer client-key"
        # Health checks and load scraping carry the upstream key too.
        checks = [s for s in p.seen + d.seen if s.path in ("/health", "/v1/models")]
        assert checks and all(s.headers["Authorization"] == "Bearer upstream-key"
                              for s in checks)

    asyncio.run(go())


@pytest.mark.parametrize("layout", ["both", "local_prefill_on_decode"])
def test_single_instance_requests_lose_client_params(layout: str) -> None:
    """Served by one instance alone the body used to go out unchanged, params and all."""
    async def go() -> None:
        alone, p = FakeInstance(), FakeInstance(remote_control=rc_for(7002))
        await alone.start()
        await p.start()
        if layout == "both":
            cfg = ProxyConfig(port=0, both_urls=(alone.url,), cluster_token=TOKEN,
                              warmup_tokens=0)
        else:
            cfg = ProxyConfig(port=0, prefill_urls=(p.url,), decode_urls=(alone.url,),
                              local_prefill_max_tokens=1000, cluster_token=TOKEN,
                              warmup_tokens=0)
        try:
            async with conductor_at(cfg) as (url, c):
                for stream in (False, True):
                    # vLLM also reads them from vllm_xargs (extra args of the request).
                    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": stream,
                            "kv_transfer_params": FORGED,
                            "vllm_xargs": {"kv_transfer_params": "x", "other": 1}}
                    async with aiohttp.ClientSession() as s, s.post(
                            url + "/v1/completions", json=body) as r:
                        assert r.status == 200
                assert c.metrics.client_params_dropped._value.get() == 2
        finally:
            await alone.stop()
            await p.stop()
        sent = alone.generation()
        assert len(sent) == 2 and not p.generation()
        for s in sent:
            assert "kv_transfer_params" not in s.body and s.body["prompt"] == "hi"
            assert s.body["vllm_xargs"] == {"other": 1}

    asyncio.run(go())


def test_without_a_token_params_are_written_unsigned() -> None:
    params = transfer_params.for_prefill(None, "t1")
    assert params == {"do_remote_decode": True, "transfer_id": "t1"}


def test_every_decode_field_is_covered_by_the_signature() -> None:
    rc = rc_for(7003)
    params = transfer_params.for_decode(TOKEN, "t2", rc, pipeline_tokens=64, pipeline_gate=True)
    assert transfer_params_refusal(TOKEN, params) is None
    assert params["pipeline_tokens"] == 64 and params["pipeline_gate"] is True
    for field, value in (("pipeline_tokens", 4096), ("transfer_id", "t3"),
                         ("remote_control", rc_for(1)), ("pipeline_gate", False)):
        tampered = {**params, field: value}
        assert transfer_params_refusal(TOKEN, tampered) is not None, field
    assert transfer_params_refusal("another-cluster-0123456789", params) is not None


@pytest.mark.parametrize("extra", [{"n": 2}, {"best_of": 3}, {"prompt": ["a", "b"]}])
def test_several_sequences_go_to_a_decode_instance_alone(extra: dict[str, Any]) -> None:
    """One transfer id carries the KV of one sequence: a request for several would register
    several decode requests under it, and all but one would wait for KV that never comes."""
    async def go() -> None:
        p, d = FakeInstance(remote_control=rc_for(7003)), FakeInstance()
        await p.start()
        await d.start()
        cfg = ProxyConfig(port=0, prefill_urls=(p.url,), decode_urls=(d.url,),
                          cluster_token=TOKEN, local_prefill_max_tokens=0, warmup_tokens=0)
        try:
            async with conductor_at(cfg) as (url, _):
                status, _ = await _post(url, {"model": MODEL, "prompt": "hello", "max_tokens": 4,
                                              **extra})
                assert status == 200
        finally:
            await p.stop()
            await d.stop()
        [d_req] = d.generation()
        assert "kv_transfer_params" not in d_req.body and not p.generation()

    asyncio.run(go())


def test_a_failed_kv_load_is_served_on_the_decode_instance_alone() -> None:
    """D answers 500 to its half of a P/D request (its KV load failed, policy "fail"): the
    conductor retries it on D alone, prefilled there, and the client gets its answer; the
    retry is counted and the request ends under the local path, not silently."""
    async def go() -> None:
        p = FakeInstance(remote_control=rc_for(7002))
        d = FakeInstance(fail_remote_prefill=(500, b'{"error": "KV load failed"}'))
        await p.start()
        await d.start()
        cfg = ProxyConfig(port=0, prefill_urls=(p.url,), decode_urls=(d.url,),
                          local_prefill_max_tokens=0, warmup_tokens=0)
        try:
            async with conductor_at(cfg) as (url, conductor):
                status, answer = await _post(url, {"model": MODEL, "prompt": "hello",
                                                   "max_tokens": 4})
                assert status == 200, answer
                m = conductor.metrics.registry
                assert m.get_sample_value("mooncake_proxy_failovers_total",
                                          {"role": "decode"}) == 1
                assert m.get_sample_value("mooncake_proxy_path_share", {"path": "local"}) == 1
        finally:
            await p.stop()
            await d.stop()
        first, second = d.generation()
        assert first.body["kv_transfer_params"]["do_remote_prefill"] is True
        assert "kv_transfer_params" not in second.body  # D alone: no transfer asked

    asyncio.run(go())
