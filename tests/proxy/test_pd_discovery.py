"""The conductor in front of a real prefill/decode pair running MooncakeVllmConnector.

One module, one pair (two vLLM processes at a time): etcd and a discovery proxy start first,
the prefill and decode instances after it, so the discovery proxy must pick them up without a
restart; a static proxy (`--prefill URL --decode URL`, remote_control by probe) serves the
relay tests; `mooncake-vllm doctor` checks the pair (healthy, wrong token, and, after the last
test kills the decode instance, a closed control port); the last test kills the decode
instance and watches discovery drop it.

Every instance and conductor here shares a cluster token, from the environment as deployed:
the conductor signs the kv_transfer_params it writes and the connectors refuse unsigned ones,
so each P/D answer below is also one that passed the connectors' signature check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from proxy_http import get_json, metric, open_stream, post, sse_events, stream_text, wait_for

from mooncake_vllm.doctor import cluster_findings
from mooncake_vllm.doctor import main as doctor_main
from mooncake_vllm.proxy.conductor import pipeline_cut
from mooncake_vllm.testing.conductor_process import ConductorProcess
from mooncake_vllm.testing.etcd_server import EtcdServer
from mooncake_vllm.testing.vllm_server import VllmServer, free_port, post_json

pytestmark = [pytest.mark.vllm, pytest.mark.etcd]

CONNECTOR = "MooncakeVllmConnector"
METADATA_TTL_S = 3
CLUSTER_TOKEN = "pd-test-cluster-token-0123456789"
ALWAYS_PD = ("--local-prefill-max-tokens", "0", "--pipeline-prefill-min-tokens", "0")
# The tiny model's shape as its connectors publish it (testing/tiny_model.py, fp32, vLLM's
# CPU block size as the servers run it).
TINY_SHAPE = {"num_layers": 4, "num_heads": 8, "head_dim": 32, "num_kv_heads": 2,
              "hidden_size": 256, "intermediate_size": 512, "dtype": "float32"}


@dataclass
class Cluster:
    etcd: EtcdServer
    discovery_proxy: ConductorProcess
    prefill: VllmServer
    decode: VllmServer
    static_proxy: ConductorProcess


def _server(model: Path, name: str, role: str, etcd: EtcdServer, cpus: list[int],
            logs: Path) -> VllmServer:
    port = free_port()
    extra = {"metadata_server": etcd.url, "advertise_url": f"http://127.0.0.1:{port}",
             "metadata_ttl_s": METADATA_TTL_S}
    # Its KV cache events, which the connector advertises in etcd for the conductor.
    events = {"enable_kv_cache_events": True, "publisher": "zmq",
              "endpoint": f"tcp://*:{free_port()}"}
    return VllmServer(model, port=port, name=name, cpus=cpus, log_path=logs / f"{name}.log",
                      kv_transfer_config={"kv_connector": CONNECTOR, "kv_role": role,
                                          "kv_connector_extra_config": extra},
                      extra_args=["--kv-events-config", json.dumps(events)])


@pytest.fixture(scope="module", autouse=True)
def cluster_token() -> Iterator[str]:
    """In the environment of every process this module starts (autouse: set before them)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MOONCAKE_VLLM_CLUSTER_TOKEN", CLUSTER_TOKEN)
    yield CLUSTER_TOKEN
    patch.undo()


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    work = tmp_path_factory.mktemp("pd")
    etcd = EtcdServer(work / "etcd").start()
    disc = p = d = static = None
    try:
        disc = ConductorProcess(["--metadata-server", etcd.url, "--health-interval-s", "0.5",
                             "--tokenizer", str(tiny_model)]).start()
        assert get_json(disc.url + "/instances")[1]["instances"] == []
        p = _server(tiny_model, "prefill", "kv_producer", etcd, [0], work)
        d = _server(tiny_model, "decode", "kv_consumer", etcd, [1], work)
        p.start()
        d.start()
        p.wait_ready()
        d.wait_ready()
        # Always P/D (never local, never pipelined): the relay tests below test that path.
        static = ConductorProcess(["--prefill", p.url, "--decode", d.url,
                                   "--health-interval-s", "0.5", *ALWAYS_PD]).start()
        warmed_up(static)
        # The discovery conductor warms the instances up too once it has found them.
        wait_for(lambda: len(get_json(disc.url + "/instances")[1]["instances"]) == 2, 30,
                 "P and D discovered")
        warmed_up(disc)
        yield Cluster(etcd, disc, p, d, static)
    finally:
        for proc in (static, disc):
            if proc is not None:
                proc.stop()
        for s in (d, p):
            if s is not None:
                s.stop()
        etcd.stop()


def warmed_up(conductor: ConductorProcess) -> ConductorProcess:
    """Once the conductor's warm-up requests (warmup.py) are done: they would count in the
    instances' metrics that the tests compare."""
    wait_for(lambda: all(i["warmed_up"] for i in get_json(conductor.url + "/instances")[1][
        "instances"]), 60, "the instances warmed up")
    return conductor


def _body(model: Path, **kw: object) -> dict:
    return {"model": str(model), "temperature": 0, **kw}


def _reference(c: Cluster, path: str, body: dict) -> dict:
    """The same request served whole by the prefill instance (no kv_transfer_params: its
    connector stays out of the way): what P/D must reproduce token for token."""
    return post_json(c.prefill.url + path, body)


def test_the_discovery_conductor_follows_each_instances_kv_events(cluster: Cluster,
                                                                 tiny_model: Path) -> None:
    """Each instance advertises its KV events endpoint in its etcd record; the conductor
    subscribes, and what the instance that prefilled a request caches reaches its index."""
    url = cluster.discovery_proxy.url

    def instances() -> list[dict]:
        return get_json(url + "/instances")[1]["instances"]

    def stored() -> float:
        return sum(i["kv_events"]["stored"] for i in instances())

    wait_for(lambda: all(i["kv_events"] is not None for i in instances()), 20,
             "a feed per instance")
    assert all(i["kv_events"]["endpoint"].startswith("tcp://127.0.0.1:") for i in instances())
    before = stored()
    body = _body(tiny_model, prompt=list(range(500, 600)), max_tokens=2)
    assert post(url + "/v1/completions", body)[0] == 200
    wait_for(lambda: stored() - before >= 3, 20, "the prompt's three blocks reported stored",
             lambda: str(instances()))


def test_discovers_instances_started_after_it(cluster: Cluster, tiny_model: Path) -> None:
    url = cluster.discovery_proxy.url

    def roles() -> dict[str, dict]:
        return {i["role"]: i for i in get_json(url + "/instances")[1]["instances"]}

    wait_for(lambda: {"prefill", "decode"} <= set(roles()), 20, "P and D discovered")
    found = roles()
    assert found["prefill"]["url"] == cluster.prefill.url
    assert found["decode"]["url"] == cluster.decode.url
    assert found["prefill"]["source"] == "discovery" and found["prefill"]["has_remote_control"]
    body = _body(tiny_model, prompt="Discovery routes this prompt through", max_tokens=12)
    ref = _reference(cluster, "/v1/completions", body)
    events = sse_events(url + "/v1/completions", {**body, "stream": True})
    assert stream_text(events, chat=False) == ref["choices"][0]["text"]


def test_pd_completion_equals_single_instance(cluster: Cluster, tiny_model: Path) -> None:
    url = cluster.static_proxy.url
    body = _body(tiny_model, prompt="Prefill here, decode there: " * 6, max_tokens=16)
    # The first request through the static proxy also probes P for its remote_control.
    assert post(url + "/v1/completions", {**body, "max_tokens": 1})[0] == 200
    p_done = metric(cluster.prefill.url, "vllm:request_success_total")
    d_done = metric(cluster.decode.url, "vllm:request_success_total")
    # Parameters a client sends are dropped (here they would name a transfer that never comes).
    forged = {"do_remote_prefill": True, "transfer_id": "forged",
              "remote_control": {"control": ["tcp://127.0.0.1:1"]}}
    status, _, raw = post(url + "/v1/completions", {**body, "kv_transfer_params": forged})
    assert status == 200, raw
    via = json.loads(raw)
    assert via["choices"][0]["text"] == _reference(cluster, "/v1/completions", body)[
        "choices"][0]["text"]
    # Both halves ran: P's one-token prefill and D's decode (the reference adds one to P).
    assert metric(cluster.prefill.url, "vllm:request_success_total") - p_done == 2
    assert metric(cluster.decode.url, "vllm:request_success_total") - d_done == 1


def test_pd_streams_completions_and_chat(cluster: Cluster, tiny_model: Path) -> None:
    url = cluster.static_proxy.url
    body = _body(tiny_model, prompt="Streams of tokens flow", max_tokens=10)
    events = sse_events(url + "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    assert stream_text(events, chat=False) == _reference(cluster, "/v1/completions", body)[
        "choices"][0]["text"]
    chat = _body(tiny_model, messages=[{"role": "user", "content": "Explain generators"}],
                 max_tokens=10)
    ref = _reference(cluster, "/v1/chat/completions", chat)["choices"][0]["message"]["content"]
    whole = post_json(url + "/v1/chat/completions", chat)
    assert whole["choices"][0]["message"]["content"] == ref
    events = sse_events(url + "/v1/chat/completions", {**chat, "stream": True})
    assert stream_text(events, chat=True) == ref


def test_a_request_id_follows_each_request_and_its_path_is_counted(
        cluster: Cluster, tiny_model: Path) -> None:
    """A token-id completion, a chat request and a streamed completion, each with the client's
    X-Request-Id: answered with it, counted under their path, and named in the logs of the
    conductor, P and D."""
    proxy = cluster.static_proxy
    requests = {
        "/v1/completions": _body(tiny_model, prompt=[5, 6, 7, 8] * 20, max_tokens=3),
        "/v1/chat/completions": _body(tiny_model, messages=[{"role": "user", "content": "Hi"}],
                                      max_tokens=3),
        "stream": _body(tiny_model, prompt="Follow me " * 20, max_tokens=3, stream=True),
    }
    sent = []
    for kind, body in requests.items():
        path = "/v1/completions" if kind == "stream" else kind
        before = metric(proxy.url, "mooncake_proxy_path_decisions_total",
                        {"path": "disaggregated"})
        rid = f"trace-{len(sent)}-{os.urandom(4).hex()}"
        status, headers, raw = post(proxy.url + path, body, headers={"X-Request-Id": rid})
        assert status == 200, raw
        assert headers.get("X-Request-Id") == rid, headers
        assert metric(proxy.url, "mooncake_proxy_path_decisions_total",
                      {"path": "disaggregated"}) == before + 1, kind
        sent.append(rid)

    def logged(where: VllmServer | ConductorProcess, rid: str) -> bool:
        return rid in where.log_path.read_text(errors="replace")

    for rid in sent:
        for where in (proxy, cluster.prefill, cluster.decode):
            wait_for(lambda w=where, r=rid: logged(w, r), 10, f"{rid} in {where.log_path}")
    # This conductor always disaggregates: so did every request of the last minutes, and D
    # counted each load as a remote prefill, none failed.
    assert metric(proxy.url, "mooncake_proxy_path_share", {"path": "disaggregated"}) == 1.0
    wait_for(lambda: metric(cluster.decode.url, "vllm:mooncake_remote_prefills_total") >= 3,
             15, "D's path counters")
    assert metric(cluster.decode.url, "vllm:mooncake_failed_loads_failed_total") == 0


def test_short_prompts_prefilled_on_decode(cluster: Cluster, tiny_model: Path) -> None:
    """--local-prefill-max-tokens: a short prompt goes to D alone (P sees nothing), a longer
    one is still disaggregated; both answer as a single instance would."""
    p, d = cluster.prefill, cluster.decode
    with ConductorProcess(["--prefill", p.url, "--decode", d.url, "--tokenizer", str(tiny_model),
                           "--local-prefill-max-tokens", "16",
                           "--pipeline-prefill-min-tokens", "0"]) as proxy:
        warmed_up(proxy)
        long_prompt = "A prompt well past the limit, " * 8
        # The first disaggregated request also probes P for its remote_control: not counted.
        assert post(proxy.url + "/v1/completions",
                    _body(tiny_model, prompt=long_prompt, max_tokens=1))[0] == 200
        for prompt, on_p in (("Short one", 0), (long_prompt, 1)):
            body = _body(tiny_model, prompt=prompt, max_tokens=8)
            ref = _reference(cluster, "/v1/completions", body)["choices"][0]["text"]
            p_done = metric(p.url, "vllm:request_success_total")
            d_done = metric(d.url, "vllm:request_success_total")
            events = sse_events(proxy.url + "/v1/completions", {**body, "stream": True})
            assert stream_text(events, chat=False) == ref, prompt
            assert metric(p.url, "vllm:request_success_total") - p_done == on_p, prompt
            assert metric(d.url, "vllm:request_success_total") - d_done == 1, prompt
        assert metric(proxy.url, "mooncake_proxy_routing_decisions_total",
                      {"role": "decode"}) >= 2


def test_long_prompts_prefilled_by_both_in_a_pipeline(cluster: Cluster,
                                                     tiny_model: Path) -> None:
    """--pipeline-prefill-min-tokens: P computes only the prompt's head, D the rest (each of
    its layers waiting for P's), and the answer is a single instance's; a chat request, which
    the conductor cannot cut, is disaggregated whole. With --pipeline-gate D waits for P to
    start the head before it schedules its part (one gate wait counted on D)."""
    p, d = cluster.prefill, cluster.decode
    with ConductorProcess(["--prefill", p.url, "--decode", d.url, "--tokenizer", str(tiny_model),
                           "--pipeline-prefill-min-tokens", "128", "--pipeline-gate",
                           "--local-prefill-max-tokens", "0"]) as proxy:
        warmed_up(proxy)
        # Disaggregated: probes P for its remote_control, and P's answer carries its shape.
        assert post(proxy.url + "/v1/completions",
                    _body(tiny_model, prompt="warm up", max_tokens=1))[0] == 200
        body = _body(tiny_model, prompt="Pipelines overlap the two halves of a prefill. " * 30,
                     max_tokens=12)
        p_tokens = metric(p.url, "vllm:prompt_tokens_total")
        d_tokens = metric(d.url, "vllm:prompt_tokens_total")
        gate_waits = metric(d.url, "vllm:mooncake_pipeline_gate_waits_total")
        events = sse_events(proxy.url + "/v1/completions", {**body, "stream": True})
        assert metric(proxy.url, "mooncake_proxy_failovers_total", {"role": "decode"}) == 0, (
            _failure(b"the pipelined request failed over", proxy, p, d))
        # P's answer may trail D's last token by a moment: its count, once it is in.
        wait_for(lambda: metric(p.url, "vllm:prompt_tokens_total") > p_tokens, 10,
                 "P's head counted", lambda: _failure(b"", proxy, p, d))
        head = metric(p.url, "vllm:prompt_tokens_total") - p_tokens
        whole = metric(d.url, "vllm:prompt_tokens_total") - d_tokens
        assert stream_text(events, chat=False) == _reference(cluster, "/v1/completions", body)[
            "choices"][0]["text"]
        # The cut balances compute with C from the shape P's first answer carried: P's share
        # (0.55) of n + n^2 / 2C, in whole blocks.
        assert whole > 256 and head == round(pipeline_cut(whole, 0.55, 1088) / 32) * 32, (
            head, whole)
        assert metric(proxy.url, "mooncake_proxy_pipelined_prefills_total") == 1
        wait_for(lambda: metric(d.url, "vllm:mooncake_pipeline_gate_waits_total")
                 - gate_waits == 1, 10, "the gate wait counted on D")
        chat = _body(tiny_model, messages=[{"role": "user", "content": body["prompt"]}],
                     max_tokens=6)
        ref = _reference(cluster, "/v1/chat/completions", chat)["choices"][0]["message"]
        assert post_json(proxy.url + "/v1/chat/completions", chat)["choices"][0][
            "message"]["content"] == ref["content"]
        assert metric(proxy.url, "mooncake_proxy_pipelined_prefills_total") == 1


def test_prefill_window_holds_a_burst_back_first_come_first_served(
        cluster: Cluster, tiny_model: Path) -> None:
    """--prefill-window-tokens: of a burst sent at once, only what fits in the window is in
    flight at P; the rest waits at the conductor and is served in turn, each answer a single
    instance's, and nothing is left in the window afterwards."""
    p, d = cluster.prefill, cluster.decode
    window = 100
    with ConductorProcess(["--prefill", p.url, "--decode", d.url, "--tokenizer", str(tiny_model),
                           "--prefill-window-tokens", str(window), *ALWAYS_PD]) as proxy:
        warmed_up(proxy)
        assert post(proxy.url + "/v1/completions",  # probes P for its remote_control
                    _body(tiny_model, prompt="warm up", max_tokens=1))[0] == 200
        bodies = [_body(tiny_model, prompt=f"Request {i} waits its turn at the window. " * 5,
                        max_tokens=6) for i in range(5)]
        refs = [_reference(cluster, "/v1/completions", b)["choices"][0]["text"] for b in bodies]
        seen: list[dict] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                seen.extend(i for i in get_json(proxy.url + "/instances")[1]["instances"]
                            if i["role"] == "prefill")
                time.sleep(0.005)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            start = threading.Barrier(len(bodies))

            def send(body: dict) -> tuple[int, dict, bytes]:
                start.wait()  # all at once, as a burst
                return post(proxy.url + "/v1/completions", body)

            with ThreadPoolExecutor(len(bodies)) as pool:
                answers = list(pool.map(send, bodies))
        finally:
            done.set()
            watcher.join()
        for (status, _, raw), ref in zip(answers, refs, strict=True):
            assert status == 200, raw
            assert json.loads(raw)["choices"][0]["text"] == ref
        # Each prompt is about 90 tokens: one fits at a time, and in flight never exceeds it.
        assert max(s["window_in_flight_tokens"] for s in seen) <= window
        last = [i for i in get_json(proxy.url + "/instances")[1]["instances"]
                if i["role"] == "prefill"][0]
        # Counted, not sampled: a loaded host once let the 5 ms samples miss every wait.
        assert last["window_waited"] >= 1, ("no request ever waited", last)
        assert last["window_in_flight_tokens"] == 0 and last["window_waiting"] == 0


def _failure(raw: bytes, *procs: ConductorProcess | VllmServer) -> str:
    """A failed answer, with what each process logged last (its metrics polls left out)."""
    tails = []
    for proc in procs:
        lines = [ln for ln in proc.log_tail(400).splitlines() if "GET /metrics" not in ln]
        name = proc.name if isinstance(proc, VllmServer) else "conductor"
        tails.append(f"--- {name}:\n" + "\n".join(lines[-40:]))
    return raw.decode(errors="replace") + "\n" + "\n".join(tails)


def _prefill_record(url: str) -> dict:
    return next(i for i in get_json(url + "/instances")[1]["instances"] if i["role"] == "prefill")


def test_model_shape_arrives_through_etcd_and_prefill_answers(cluster: Cluster) -> None:
    """The connector publishes its model's shape in its etcd record (the discovery conductor)
    and in every prefill answer (the static conductor learns it from its first P/D request)."""
    wait_for(lambda: _prefill_record(cluster.discovery_proxy.url)["model_shape"] is not None,
             20, "the shape from etcd")
    shape = _prefill_record(cluster.discovery_proxy.url)["model_shape"]
    assert {k: shape[k] for k in TINY_SHAPE} == TINY_SHAPE and shape["block_size"] >= 1
    url = cluster.static_proxy.url
    assert post(url + "/v1/completions", {"prompt": "shape", "max_tokens": 1})[0] == 200
    assert _prefill_record(url)["model_shape"] == shape


def test_plain_conductor_plans_each_request(cluster: Cluster, tiny_model: Path) -> None:
    """`proxy --prefill P --decode D` and nothing else: after its warm-up a 1-token prompt is
    prefilled on D alone; long prompts, as token ids and as text (ids from D's /tokenize), are
    prefilled by P and D in a pipeline; the same long prompt while D decodes another request
    is disaggregated, since prefilling on D would cost that request's ITL more than the ITL
    SLO. Every answer equals a single instance's."""
    p, d = cluster.prefill, cluster.decode
    # A health timeout well past a loaded host's stalls: a Ping P misses would make the
    # conductor probe P again, and the probe's token would count as P's here.
    with ConductorProcess(["--prefill", p.url, "--decode", d.url,
                           "--health-timeout-s", "10"]) as proxy:
        url = warmed_up(proxy).url

        def served(body: dict) -> tuple[float, float]:
            """Prompt tokens P and D computed for this request; its answer is a single
            instance's."""
            before = (metric(p.url, "vllm:prompt_tokens_total"),
                      metric(d.url, "vllm:prompt_tokens_total"))
            status, _, raw = post(url + "/v1/completions", body)
            assert status == 200, _failure(raw, proxy, p, d)
            counted = (metric(p.url, "vllm:prompt_tokens_total") - before[0],
                       metric(d.url, "vllm:prompt_tokens_total") - before[1])
            assert json.loads(raw)["choices"][0]["text"] == _reference(
                cluster, "/v1/completions", body)["choices"][0]["text"]
            return counted

        def paths() -> dict[str, float]:
            return {path: metric(url, "mooncake_proxy_path_decisions_total", {"path": path})
                    for path in ("local", "pipelined", "disaggregated")}

        def seen() -> str:  # what the conductor predicted from, for a failure's message
            return json.dumps([get_json(url + "/instances")[1], paths()])

        on_p, on_d = served(_body(tiny_model, prompt=[7], max_tokens=4))
        assert (on_p, on_d) == (0, 1) and paths()["local"] == 1, seen()
        # The first request through P probes it for its remote_control and learns its shape
        # from the answer: not counted.
        served(_body(tiny_model, prompt=[(i * 5) % 2000 + 20 for i in range(1900)],
                     max_tokens=2))
        assert paths()["pipelined"] == 1, seen()
        ids = [(i * 7) % 2000 + 20 for i in range(1900)]
        on_p, on_d = served(_body(tiny_model, prompt=ids, max_tokens=6))
        assert paths()["pipelined"] == 2, seen()
        # The cut from the published shape (C = 1088, P's share 0.55 of the compute).
        assert on_d == 1900 and on_p == 1248, (on_p, on_d)

        text = "Pipelines overlap the two halves of a prefill, one layer apart. " * 110
        served(_body(tiny_model, prompt=text, max_tokens=6))
        assert metric(url, "mooncake_proxy_tokenize_calls_total", {"outcome": "ok"}) == 1
        assert paths()["pipelined"] == 3, seen()

        # D decodes a long request (short prompt: prefilled on D) while the long prompt comes.
        running = _body(tiny_model, prompt="Keep talking", max_tokens=3000, ignore_eos=True,
                        stream=True)
        conn, first = open_stream(url, "/v1/completions", running)
        try:
            assert first.startswith(b"data: ")
            wait_for(lambda: metric(d.url, "vllm:num_requests_running") == 1, 10, "D decodes")
            time.sleep(1.0)  # gaps of D's stream: the conductor learns D's decode steps
            other = [(i * 11) % 2000 + 20 for i in range(1900)]
            on_p, _ = served(_body(tiny_model, prompt=other, max_tokens=4))
            assert on_p == 1900 and paths()["disaggregated"] == 1, seen()
        finally:
            conn.close()
        report = get_json(url + "/admission")[1]
        assert report["paths"]["pipelined"] == 3 and report["slo_itl_s"] == 0.1
        assert report["mean_abs_error_s"] is not None
        assert metric(url, "mooncake_proxy_warmups_total", {"outcome": "ok"}) == 2


def _doctor(*args: str, token: str = CLUSTER_TOKEN) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MOONCAKE_VLLM_CLUSTER_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "mooncake_vllm.cli", "doctor", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_doctor_checks_the_pair_from_both_sides(cluster: Cluster) -> None:
    """Through etcd and p2p: every instance answers, the layouts agree, D reaches P's control
    endpoint from its side and P writes into D's scratch region over TCP, timed."""
    for args in (["--metadata-server", cluster.etcd.url],
                 ["--prefill", cluster.prefill.url, "--decode", cluster.decode.url]):
        run = _doctor(*args)
        assert run.returncode == 0, run.stdout + run.stderr
        lines = run.stdout.splitlines()
        assert any(ln.startswith("ok  prefill->decode") and "tcp:" in ln and "MB/s" in ln
                   for ln in lines), run.stdout
        assert any(ln.startswith("ok  decode->prefill") for ln in lines), run.stdout
        assert any(ln.startswith("ok  layout") for ln in lines), run.stdout
        assert "FAIL" not in run.stdout


def test_doctor_names_a_token_mismatch(cluster: Cluster) -> None:
    """A doctor with another cluster's token: every worker refuses its Pings, and the fix says
    to use one token; p2p, the instances refuse its signed probe."""
    run = _doctor("--metadata-server", cluster.etcd.url, token="another-cluster-token-0123456")
    assert run.returncode == 1, run.stdout
    fails = [ln for ln in run.stdout.splitlines() if ln.startswith("FAIL control")]
    assert len(fails) == 2 and all("its cluster token is not this one" in ln for ln in fails), \
        run.stdout
    assert "fix: give the doctor and every instance the same cluster token" in run.stdout
    run = _doctor("--prefill", cluster.prefill.url, "--decode", cluster.decode.url,
                  token="another-cluster-token-0123456")
    assert run.returncode == 1 and "FAIL connector" in run.stdout, run.stdout


def test_a_restarted_prefill_is_found_again_and_serves(cluster: Cluster,
                                                       tiny_model: Path) -> None:
    """P restarted on new engine and control ports (and a new instance id in etcd): the static
    conductor drops the control endpoint it had probed and asks again, the discovery conductor
    drops the dead record when its lease ends; both serve correctly without waiting out a
    transfer deadline, and the doctor then finds the cluster healthy."""
    p = cluster.prefill
    old = [i["instance_id"] for i in get_json(cluster.discovery_proxy.url + "/instances")[1][
        "instances"] if i["role"] == "prefill"]
    p.stop()
    p.start().wait_ready()

    def prefills() -> list[str]:
        return [i["instance_id"] for i in get_json(cluster.discovery_proxy.url + "/instances")[1][
            "instances"] if i["role"] == "prefill"]

    wait_for(lambda: len(prefills()) == 1 and prefills() != old, METADATA_TTL_S + 30,
             "the new prefill record alone")
    body = _body(tiny_model, prompt="After a restart, the same answer. " * 8, max_tokens=6)
    ref = _reference(cluster, "/v1/completions", body)["choices"][0]["text"]
    for proxy in (cluster.static_proxy, cluster.discovery_proxy):
        wait_for(lambda pr=proxy: get_json(pr.url + "/health")[0] == 200, 30, "back in rotation")
        started = time.monotonic()
        status, _, raw = post(proxy.url + "/v1/completions", body)
        assert status == 200, _failure(raw, proxy, p, cluster.decode)
        assert json.loads(raw)["choices"][0]["text"] == ref
        assert time.monotonic() - started < 20, "a transfer deadline was waited out"
    run = _doctor("--metadata-server", cluster.etcd.url)
    assert run.returncode == 0, run.stdout


def test_pd_client_disconnect_releases_kv_on_both(cluster: Cluster, tiny_model: Path) -> None:
    p, d = cluster.prefill, cluster.decode
    body = _body(tiny_model, prompt="Keep talking: " * 40, max_tokens=3500, stream=True,
                 ignore_eos=True)
    conn, first = open_stream(cluster.static_proxy.url, "/v1/completions", body)
    assert first.startswith(b"data: ")
    wait_for(lambda: metric(d.url, "vllm:num_requests_running") == 1, 10, "D decodes")
    assert metric(d.url, "vllm:kv_cache_usage_perc") > 0
    conn.close()
    for s in (d, p):
        wait_for(lambda s=s: metric(s.url, "vllm:num_requests_running") == 0
                 and metric(s.url, "vllm:kv_cache_usage_perc") == 0, 20,
                 f"{s.name} released the request and its KV")


def test_killed_decode_instance_leaves_discovery(cluster: Cluster) -> None:
    """Last: kills the decode instance. Its lease expires and discovery drops it."""
    url = cluster.discovery_proxy.url
    cluster.decode.kill()
    # At once, while its record is still in etcd: the doctor finds its ports closed.
    args = argparse.Namespace(metadata_server=cluster.etcd.url, namespace=None, token_file=None,
                              prefill=[], decode=[])
    found = cluster_findings(args)
    closed = [f for f in found if f.check == "control" and not f.ok]
    assert closed and "nothing accepts connections" in closed[0].detail, found
    assert "lease expires" in closed[0].fix
    assert doctor_main(["--metadata-server", cluster.etcd.url]) == 1

    def decode_known() -> bool:
        return any(i["role"] == "decode" for i in get_json(url + "/instances")[1]["instances"])

    wait_for(lambda: not decode_known(), METADATA_TTL_S + 15, "dead decode instance removed")
    status, health = get_json(url + "/health")
    assert status == 503 and health["healthy"]["decode"] == 0
    status, _, raw = post(url + "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 503 and b"no healthy instance" in raw
