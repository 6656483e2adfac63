"""The conductor's front door on real sockets: the body size cap, large bodies parsed off the
event loop, the concurrency limit, the operator views behind the admin token, and upstream
error bodies kept from clients."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from unittest import mock

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request
from fake_upstream import MODEL, FakeInstance, conductor_at

from mooncake_vllm.proxy.access import admin_refusal
from mooncake_vllm.proxy.conductor import Conductor
from mooncake_vllm.proxy.config import ProxyConfig
from mooncake_vllm.proxy.limits import OFF_LOOP_BYTES

MIB = 1024 * 1024


def _body(prompt: str = "hi", **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 2, **kw}


async def _timed_post(s: aiohttp.ClientSession, url: str, data: Any,
                      headers: dict[str, str] | None = None) -> tuple[int, Any, float]:
    t0 = time.monotonic()
    async with s.post(url + "/v1/completions", data=data,
                      headers={"Content-Type": "application/json", **(headers or {})}) as r:
        raw = await r.read()
        return r.status, (json.loads(raw) if raw else None), time.monotonic() - t0


def _serve(fn: Any, **cfg: Any) -> None:
    """Run `fn(url, conductor, instance)` against a conductor with one "both" stand-in."""
    async def go() -> None:
        inst = FakeInstance()
        await inst.start()
        try:
            config = ProxyConfig(port=0, both_urls=(inst.url,), **{"warmup_tokens": 0, **cfg})
            async with conductor_at(config) as (url, c):
                await fn(url, c, inst)
        finally:
            await inst.stop()

    asyncio.run(go())


def test_oversized_body_is_413_and_others_are_served_meanwhile() -> None:
    """A body past --max-body-bytes is refused before it is read or parsed (it was parsed on
    the event loop, stalling every other request), declared length or not."""
    big = json.dumps(_body("x" * (48 * MIB))).encode()

    async def fn(url: str, c: Conductor, inst: FakeInstance) -> None:
        async with aiohttp.ClientSession() as s, aiohttp.ClientSession() as other:
            assert (await _timed_post(other, url, json.dumps(_body())))[0] == 200  # connected
            big_task = asyncio.create_task(_timed_post(s, url, big))
            small = []
            while not big_task.done() or len(small) < 5:
                status, _, took = await _timed_post(other, url, json.dumps(_body()))
                assert status == 200
                small.append(took)
            # Client, conductor and instance share this test's one event loop, and the rest
            # of the refused body still crosses it: the bound leaves room for that, not for
            # parsing the body (which held the loop several times as long).
            assert max(small) < 0.75, small
            status, answer, _ = await big_task
            assert status == 413, status
            assert "--max-body-bytes" in answer["error"]["message"]

            async def chunks() -> Any:  # no Content-Length: refused once past the cap
                for i in range(0, len(big), MIB):
                    yield big[i:i + MIB]

            status, answer, _ = await _timed_post(s, url, chunks())
            assert status == 413 and "--max-body-bytes" in answer["error"]["message"]
        assert all(len(s.body["prompt"]) == 2 for s in inst.generation())
        assert c.metrics.rejections.labels("body_too_large")._value.get() == 2

    _serve(fn)


def test_large_body_is_parsed_off_the_event_loop() -> None:
    """Tokenizing or hashing a long prompt takes a while; meanwhile the loop serves others."""
    async def fn(url: str, c: Conductor, inst: FakeInstance) -> None:
        real_key = c.hasher.key

        def slow_key(chat: bool, body: dict[str, Any]) -> Any:
            if len(body["prompt"]) >= OFF_LOOP_BYTES:
                time.sleep(1.5)  # blocks whichever thread runs it
            return real_key(chat, body)

        with mock.patch.object(c.hasher, "key", slow_key):
            async with aiohttp.ClientSession() as s:
                long = json.dumps(_body("y" * (2 * OFF_LOOP_BYTES)))
                long_task = asyncio.create_task(_timed_post(s, url, long))
                await asyncio.sleep(0.1)
                status, _, took = await _timed_post(s, url, json.dumps(_body()))
                assert status == 200 and took < 0.75, took
                assert not long_task.done()
                assert (await long_task)[0] == 200

    _serve(fn)


def test_requests_beyond_the_limit_are_refused_at_once() -> None:
    async def fn(url: str, c: Conductor, inst: FakeInstance) -> None:
        inst.hold = asyncio.Event()
        async with aiohttp.ClientSession() as s:
            held = [asyncio.create_task(_timed_post(s, url, json.dumps(_body())))
                    for _ in range(2)]
            while len(inst.generation()) < 2:
                await asyncio.sleep(0.01)
            status, answer, took = await asyncio.wait_for(
                _timed_post(s, url, json.dumps(_body())), 5)
            assert status == 503 and took < 1.0
            assert answer["error"]["type"] == "overloaded"
            assert "--max-concurrent-requests" in answer["error"]["message"]
            assert c.metrics.in_flight._value.get() == 2
            inst.hold.set()
            assert [(await t)[0] for t in held] == [200, 200]
            assert (await _timed_post(s, url, json.dumps(_body())))[0] == 200
        assert len(inst.generation()) == 3
        assert c.metrics.rejections.labels("concurrency")._value.get() == 1
        assert c.metrics.in_flight._value.get() == 0

    _serve(fn, max_concurrent_requests=2)


def test_a_body_that_does_not_arrive_frees_its_slot() -> None:
    """A client that sends headers and then trickles (here: stops) its body is answered 408
    after the body deadline; its slot is free again for others."""
    async def fn(url: str, c: Conductor, inst: FakeInstance) -> None:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"pro")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status_line.split()[1] == b"408", status_line
        assert c.metrics.rejections.labels("body_timeout")._value.get() == 1
        assert c.metrics.in_flight._value.get() == 0
        async with aiohttp.ClientSession() as s:
            assert (await _timed_post(s, url, json.dumps(_body())))[0] == 200

    _serve(fn, body_timeout_s=0.5, max_concurrent_requests=1)


def test_operator_views_need_the_admin_token() -> None:
    async def fn(url: str, c: Conductor, inst: FakeInstance) -> None:
        async with aiohttp.ClientSession() as s:
            for path in ("/instances", "/admission"):
                for headers, want in (({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                      ({"Authorization": "Basic admin-secret-0123456789"}, 401),
                                      ({"Authorization": "Bearer admin-secret-0123456789"}, 200)):
                    async with s.get(url + path, headers=headers) as r:
                        assert r.status == want, (path, headers)
                        if want == 401:
                            assert inst.url not in await r.text()
            for path in ("/health", "/metrics"):  # open: load balancers, Prometheus
                async with s.get(url + path) as r:
                    assert r.status == 200, path

    _serve(fn, admin_token="admin-secret-0123456789")


@pytest.mark.parametrize("peer,allowed", [("127.0.0.1", True), ("::1", True),
                                          ("::ffff:127.0.0.1", True), ("10.1.2.3", False),
                                          ("::ffff:10.1.2.3", False), ("fd00::1", False)])
def test_without_an_admin_token_views_are_for_loopback_only(peer: str, allowed: bool) -> None:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda k, d=None: (peer, 40000) \
        if k == "peername" else d
    request = make_mocked_request("GET", "/instances", transport=transport)
    refused = admin_refusal(request, None)
    assert (refused is None) == allowed
    if refused is not None:
        assert refused.status == 403


def test_upstream_error_bodies_are_not_passed_to_clients() -> None:
    secret = b"<html>internal admin page of 10.9.8.7</html>"

    async def fn(url: str, c: Conductor, inst: FakeInstance) -> None:
        async with aiohttp.ClientSession() as s:
            for status, body, want_status, want in (
                    (500, secret, 502, "the both instance answered 500"),
                    (404, secret, 404, "the both instance refused the request (404)"),
                    (400, json.dumps({"error": {"message": "prompt is too long",
                                                "type": "BadRequestError"}}).encode(),
                     400, "prompt is too long")):
                inst.fail = (status, body)
                got, answer, _ = await _timed_post(s, url, json.dumps(_body()))
                text = json.dumps(answer)
                assert got == want_status and want in answer["error"]["message"], answer
                assert "internal admin" not in text and inst.url.split("//")[1] not in text

    _serve(fn, max_attempts=1)
