"""The conductor in front of two real, plain `vllm serve` instances (role "both"): relay of
completions and chat, streamed and not, 400s, client disconnect, health removal and recovery,
failover from a killed instance, and early rejection under overload."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from proxy_http import (
    KV_EVENTS,
    get_json,
    instance,
    metric,
    open_stream,
    post,
    sse_events,
    stream_text,
    wait_for,
)

from mooncake_vllm.proxy.discovery import static_id
from mooncake_vllm.testing.conductor_process import ConductorProcess
from mooncake_vllm.testing.vllm_server import VllmServer, post_json

pytestmark = pytest.mark.vllm


def _corpus() -> str:
    from pydoc_data import topics

    return "\n".join(str(v) for v in topics.topics.values())


@pytest.fixture(scope="module")
def proxy(two_plain_servers: tuple[VllmServer, VllmServer], tiny_model: Path
          ) -> Iterator[ConductorProcess]:
    a, b = two_plain_servers
    with ConductorProcess(["--both", a.url, "--both", b.url, "--tokenizer", str(tiny_model),
                           "--kv-events", f"{a.url}={KV_EVENTS[a.url]}",
                           "--health-interval-s", "0.5", "--health-timeout-s", "1"]) as p:
        wait_for(lambda: get_json(p.url + "/health")[0] == 200, 30, "proxy healthy")
        yield p


def test_the_prefix_index_follows_vllms_kv_events(proxy: ConductorProcess, two_plain_servers,
                                                  tiny_model: Path) -> None:
    """What the instance caches reaches the conductor's index even for a request the
    conductor never saw (sent to the instance directly), and a cleared cache empties it."""
    a, _ = two_plain_servers
    me = static_id("both", a.url)

    def seen() -> dict:
        return instance(proxy.url, me)

    # The conductor's warm-up requests are cached too: once they are done, nothing but this
    # test's requests reaches the instance.
    wait_for(lambda: seen()["kv_events"] is not None and seen()["warmed_up"], 60,
             "the feed set up and the warm-up done")
    before = seen()["kv_events"]["stored"]
    prompt = list(range(300, 400))  # 100 token ids: three full blocks of 32
    post_json(a.url + "/v1/completions", _body(tiny_model, prompt=prompt, max_tokens=1))
    wait_for(lambda: seen()["kv_events"]["stored"] - before >= 3, 20,
             "the three blocks reported stored", lambda: str(seen()))
    assert seen()["prefix_blocks"] >= 3
    status, _, raw = post(a.url + "/reset_prefix_cache", {})
    assert status == 200, raw
    # vLLM publishes a step's events with the step: one more (a prompt shorter than a block,
    # which caches nothing) carries the reset's.
    post_json(a.url + "/v1/completions", _body(tiny_model, prompt=[5, 6, 7], max_tokens=1))
    wait_for(lambda: seen()["prefix_blocks"] == 0, 20, "the index emptied with vLLM's cache",
             lambda: str(seen()))
    assert seen()["kv_events"]["cleared"] >= 1 and seen()["kv_events"]["bad"] == 0


def _body(model: Path, **kw: object) -> dict:
    return {"model": str(model), "temperature": 0, **kw}


def test_completion_relayed_equal_to_direct(proxy: ConductorProcess, two_plain_servers,
                                            tiny_model: Path) -> None:
    body = _body(tiny_model, prompt="The quick brown fox jumps over", max_tokens=12)
    direct = post_json(two_plain_servers[0].url + "/v1/completions", body)
    status, _, raw = post(proxy.url + "/v1/completions", body)
    assert status == 200, raw
    import json

    via = json.loads(raw)
    assert via["choices"][0]["text"] == direct["choices"][0]["text"]
    assert via["usage"]["completion_tokens"] == 12


def test_completion_streamed_token_by_token(proxy: ConductorProcess, tiny_model: Path) -> None:
    body = _body(tiny_model, prompt="Streaming is a way to", max_tokens=10)
    whole = post_json(proxy.url + "/v1/completions", body)["choices"][0]["text"]
    events = sse_events(proxy.url + "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    assert len([e for e in events if isinstance(e, dict)]) >= 2  # relayed as it is produced
    assert stream_text(events, chat=False) == whole


def test_chat_streamed_and_not(proxy: ConductorProcess, tiny_model: Path) -> None:
    body = _body(tiny_model, messages=[{"role": "user", "content": "Tell me about lists"}],
                 max_tokens=8)
    whole = post_json(proxy.url + "/v1/chat/completions", body)
    assert whole["object"] == "chat.completion"
    text = whole["choices"][0]["message"]["content"]
    events = sse_events(proxy.url + "/v1/chat/completions", {**body, "stream": True})
    assert events[0]["object"] == "chat.completion.chunk" and events[-1] == "[DONE]"
    assert stream_text(events, chat=True) == text and text


@pytest.mark.parametrize("path,raw,needle", [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", b"[1, 2]", "must be a JSON object"),
    ("/v1/completions", b'{"model": "m"}', "missing field 'prompt'"),
    ("/v1/chat/completions", b'{"model": "m", "prompt": "x"}', "missing field 'messages'"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', "'stream' must be true or false"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', "'max_tokens' must be a positive"),
])
def test_bad_input_is_400_naming_the_problem(proxy: ConductorProcess, path: str, raw: bytes,
                                             needle: str) -> None:
    import json

    status, _, data = post(proxy.url + path, None, raw=raw)
    assert status == 400
    assert needle in json.loads(data)["error"]["message"]


def test_upstream_4xx_is_relayed(proxy: ConductorProcess) -> None:
    status, _, data = post(proxy.url + "/v1/completions",
                           {"model": "no-such-model", "prompt": "x", "max_tokens": 1})
    assert status == 404 and b"no-such-model" in data


def test_models_health_metrics(proxy: ConductorProcess, tiny_model: Path) -> None:
    status, models = get_json(proxy.url + "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == [str(tiny_model)]
    status, health = get_json(proxy.url + "/health")
    assert status == 200 and health["healthy"]["both"] == 2
    assert metric(proxy.url, "mooncake_proxy_requests_total",
                  {"endpoint": "completions", "outcome": "200"}) >= 2
    assert metric(proxy.url, "mooncake_proxy_routing_decisions_total",
                  {"policy": "cache_aware", "role": "both"}) >= 4
    assert metric(proxy.url, "mooncake_proxy_ttft_seconds_count") >= 2


def _running(server: VllmServer) -> float:
    return metric(server.url, "vllm:num_requests_running")


def _generated(server: VllmServer) -> float:
    return metric(server.url, "vllm:generation_tokens_total")


def test_client_disconnect_aborts_upstream(proxy: ConductorProcess, two_plain_servers,
                                           tiny_model: Path) -> None:
    a, b = two_plain_servers
    max_tokens = 4000
    before = _generated(a) + _generated(b)
    body = _body(tiny_model, prompt="A long answer:", max_tokens=max_tokens, stream=True,
                 ignore_eos=True)
    conn, first = open_stream(proxy.url, "/v1/completions", body)
    assert first.startswith(b"data: ")
    # The client goes away at its first event. At once: vLLM's engine runs far ahead of its
    # API server (a tiny model decodes a token in well under a millisecond here), so a
    # client that lingers lets the engine finish all 4000 tokens before any abort can land.
    conn.close()

    # Aborted upstream: the token counters stop moving well short of max_tokens. (The counters,
    # not vLLM's running-requests gauge: that gauge is refreshed only by engine steps.)
    samples = [_generated(a) + _generated(b)]

    def settled() -> bool:
        samples.append(_generated(a) + _generated(b))
        return len(samples) >= 5 and samples[-1] == samples[-5]

    try:
        wait_for(settled, 30, "token generation stopped after the client left", interval_s=0.5)
    except AssertionError as e:
        raise AssertionError(f"{e}; generated since start: {samples[-1] - before:.0f}; "
                             f"running a={_running(a)} b={_running(b)}\n"
                             f"proxy log:\n{proxy.log_tail()}") from None
    assert samples[-1] - before < max_tokens, "the request ran to completion: never aborted"
    wait_for(lambda: metric(proxy.url, "mooncake_proxy_requests_total",
                            {"outcome": "client_gone"}) >= 1, 10,
             "the conductor counted the request as client_gone")


def test_unresponsive_instance_taken_out_until_it_recovers(
        proxy: ConductorProcess, two_plain_servers, tiny_model: Path) -> None:
    a, b = two_plain_servers
    b_id = static_id("both", b.url)
    assert b.proc is not None
    os.killpg(b.proc.pid, signal.SIGSTOP)  # hangs: /health stops answering
    try:
        wait_for(lambda: not instance(proxy.url, b_id)["healthy"], 10, "b out of rotation")
        before = metric(proxy.url, "mooncake_proxy_routing_decisions_total", {"instance": b_id})
        for i in range(4):
            body = _body(tiny_model, prompt=f"Request {i} while b hangs", max_tokens=2)
            assert post(proxy.url + "/v1/completions", body, timeout_s=30)[0] == 200
        after = metric(proxy.url, "mooncake_proxy_routing_decisions_total", {"instance": b_id})
        assert after == before
    finally:
        os.killpg(b.proc.pid, signal.SIGCONT)
    wait_for(lambda: instance(proxy.url, b_id)["healthy"], 15, "b back in rotation")


def test_instance_back_between_health_rounds_serves_at_once(two_plain_servers,
                                                           tiny_model: Path) -> None:
    """The race a discovered instance runs (it registers before it listens): the one health
    round so far found it down, it serves now, and the next round is a minute away. A request
    must not be refused for that minute: finding nothing in rotation, the conductor rechecks."""
    _, b = two_plain_servers
    b_id = static_id("both", b.url)
    assert b.proc is not None
    os.killpg(b.proc.pid, signal.SIGSTOP)
    try:
        with ConductorProcess(["--both", b.url, "--health-interval-s", "60",
                           "--health-timeout-s", "1"]) as p:
            wait_for(lambda: not instance(p.url, b_id)["healthy"], 10, "b out of rotation")
            os.killpg(b.proc.pid, signal.SIGCONT)
            body = _body(tiny_model, prompt="Back before the next round", max_tokens=3)
            status, _, raw = post(p.url + "/v1/completions", body, timeout_s=30)
            assert status == 200, raw
            assert instance(p.url, b_id)["healthy"]
            assert metric(p.url, "mooncake_proxy_rejections_total",
                          {"reason": "no_instance"}) == 0
    finally:
        os.killpg(b.proc.pid, signal.SIGCONT)  # also when the test failed before resuming b


def test_early_rejection_under_overload(two_plain_servers, tiny_model: Path) -> None:
    a, b = two_plain_servers
    text = _corpus()
    prompt = text[:8000]  # ~2200 tokens
    # This machine's speed varies with what else runs: measure it, and set the SLO so that
    # one such request meets it comfortably and a queue of several cannot.
    took = []
    for _ in range(3):
        t0 = time.monotonic()
        post_json(a.url + "/v1/completions", _body(tiny_model, prompt=prompt, max_tokens=1))
        took.append(time.monotonic() - t0)
    slo = 3.0 * max(took)
    args = ["--both", a.url, "--both", b.url, "--tokenizer", str(tiny_model),
            "--policy", "least_loaded", "--slo-ttft-s", f"{slo:.3f}"]
    with ConductorProcess(args) as p:
        wait_for(lambda: get_json(p.url + "/health")[0] == 200, 30, "proxy healthy")

        def ask(i: int, n_chars: int) -> tuple[int, dict[str, str], float]:
            # Each prompt starts elsewhere in the text: no prefix-cache hit between them.
            body = _body(tiny_model, prompt=text[i * 5000: i * 5000 + n_chars], max_tokens=1,
                         stream=True)
            t0 = time.monotonic()
            status, headers, _ = post(p.url + "/v1/completions", body, timeout_s=120)
            return status, headers, time.monotonic() - t0

        # Teach the TTFT model how fast these instances prefill (several prompt sizes).
        for i, n in enumerate((1000, 4000, 8000, 2000, 6000, 8000)):
            assert ask(i, n)[0] == 200
        # Then bursts: 16 such prompts at once, ~8 queued per instance, ~2.7x the SLO. The
        # first is served whole (the admitted requests had met the SLO: no evidence yet that
        # predicted misses come true) and misses the SLO; from then on, what is predicted to
        # miss is refused. The prediction is learned from a noisy 2-core host, so the
        # overload is sustained for up to three more bursts until refusals come.
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            first = list(pool.map(lambda i: ask(i, 8000), range(10, 26)))
            assert [r[0] for r in first] == [200] * 16
            assert get_json(p.url + "/admission")[1]["refusing_for"] == ["ttft"]
            results: list[tuple[int, dict[str, str], float]] = []
            for burst in range(3):
                start = 26 + 16 * burst
                results += pool.map(lambda i: ask(i, 8000), range(start, start + 16))
                if any(r[0] == 503 for r in results):
                    break
        rejected = [r for r in results if r[0] == 503]
        admitted = [r for r in results if r[0] == 200]
        assert rejected and admitted, [r[0] for r in results]
        for _, headers, _took in rejected:
            assert int(headers["Retry-After"]) >= 1
        # Refused at once, not after queueing (on a 2-core host sixteen requests at once
        # still take their time through the front door: measured against the admitted).
        refused_in = sorted(took for _, _, took in rejected)
        assert refused_in[len(refused_in) // 2] < slo
        assert refused_in[-1] < max(took for _, _, took in admitted)
        report = get_json(p.url + "/admission")[1]
        assert report["rejected"] == len(rejected)
        observed = [o for o in report["recent"] if o["observed_ttft_s"] is not None]
        assert len(observed) >= 6 + 16 + len(admitted) - 1
        assert metric(p.url, "mooncake_proxy_rejections_total", {"reason": "slo"}) == len(rejected)


def test_killed_instance_fails_over(two_plain_servers, tiny_model: Path) -> None:
    """Last in this module: it kills one of the shared servers."""
    a, b = two_plain_servers
    b_id = static_id("both", b.url)
    # Round-robin and a slow health loop: requests do land on b after it died, before any
    # health check notices; only failover can save them.
    with ConductorProcess(["--both", a.url, "--both", b.url, "--policy", "round_robin",
                       "--health-interval-s", "60"]) as p:
        a_id = static_id("both", a.url)
        # One health round done (it fetched the models), so the next is a minute away.
        wait_for(lambda: instance(p.url, a_id)["models"] and instance(p.url, b_id)["models"],
                 30, "first health round")
        b.kill()
        for i in range(4):
            body = _body(tiny_model, prompt=f"After the crash {i}", max_tokens=3,
                         stream=bool(i % 2))
            status, _, data = post(p.url + "/v1/completions", body, timeout_s=60)
            assert status == 200, data
        assert metric(p.url, "mooncake_proxy_failovers_total", {"role": "both"}) >= 1
        assert metric(p.url, "mooncake_proxy_upstream_errors_total",
                      {"instance": b_id, "kind": "connect"}) >= 1
        assert instance(p.url, b_id)["healthy"] is False
