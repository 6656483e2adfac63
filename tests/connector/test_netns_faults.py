"""Network faults between real vLLM instances: P and D each in a network namespace of their own,
joined by a veth pair for the data (transfer engine + control channel), which the test cuts
with `ip link set ... down` while a P/D request is in flight and then restores.

    root namespace (pytest) --mgmt veth-- P's namespace --data veth-- D's namespace
                            \\-------------------mgmt veth--------------------/

HTTP goes over the management pairs, which are never cut, so the test still reaches both
servers while the data link is down. The connector's `hostname` is the data address (not
loopback, so a cluster token signs everything). Deadlines are short: D answers a request whose
prefill instance fell silent within its write horizon (transfer_timeout_s + delivery bound +
engine_timeout_s + 1 = 15 s here), P gives up on writes after engine_timeout_s and on a
registration after registration_timeout_s. Needs root and `ip netns`; skipped otherwise.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mooncake_vllm.config import CONTROL_DELIVERY_S, ConnectorConfig
from mooncake_vllm.security import sign_transfer_params
from mooncake_vllm.testing.vllm_server import VllmServer

from .pd import (
    assert_same_greedy,
    completion,
    kv_config,
    kv_usage,
    log_text,
    pd_completion,
    probe_remote_control,
    prompt_ids,
    start_all,
    wait_for,
)

pytestmark = pytest.mark.vllm
TOKEN = "netns-test-token-" + uuid.uuid4().hex
D_SHORT = {"transfer_timeout_s": 6, "engine_timeout_s": 3, "pipeline_silence_timeout_s": 2}
P_SHORT = {"engine_timeout_s": 3, "registration_timeout_s": 6}  # engine_timeout_s as D's
HORIZON_S = ConnectorConfig(**D_SHORT).write_horizon_s  # 15 s
SLACK_S = 10.0  # scheduler steps, HTTP, a loaded 2-core machine
BOUND_S = HORIZON_S + SLACK_S  # D's answer, and P's blocks back, whatever the network does
HANG_S = BOUND_S + 30  # no answer by then: a hang (also the halves' HTTP timeout)
# From sending a P/D pair to cutting the link: D has registered with P (its half needs no
# compute) and P is still computing the 3000-token prompt, writing layer by layer.
CUT_AFTER_S = 0.3
REGISTERED_S = 1.0  # D's half sent -> D has registered with P (D computes nothing first)
# After the link is back: a control connection that went quiet during the cut is dropped by
# its heartbeat within CONTROL_DELIVERY_S, with whatever was queued on it (at most once, by
# design). A cut about that long, then a registration sent right after the restore, lost the
# registration once here (the request then failed at D's transfer_timeout_s, as it should).
# Past this, every connection either recovered or was dropped and made anew.
SETTLE_S = CONTROL_DELIVERY_S + 2


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} -> {r.returncode}: {r.stderr.strip()}")
    return r


def _netns_unavailable() -> str | None:
    """Why this machine cannot run the test (no root, no `ip`, no namespaces or veth pairs)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"mvprobe{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    try:
        r = _ip("-n", probe, "link", "add", "name", "probe0", "type", "veth", "peer", "name",
                "probe1", check=False)
        if r.returncode != 0:
            return f"no veth pairs here: {r.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Net:
    p_ns: str
    d_ns: str
    p_mgmt: str  # HTTP addresses, reachable from the root namespace
    d_mgmt: str
    p_data: str  # the connectors' hostnames, joined only by the data veth pair
    d_data: str
    p_data_if: str  # P's end of the data pair (in P's namespace)

    def cut(self) -> None:
        _ip("-n", self.p_ns, "link", "set", self.p_data_if, "down")

    def restore(self) -> None:
        _ip("-n", self.p_ns, "link", "set", self.p_data_if, "up")

    def data_link_up(self) -> bool:
        for ns, addr in ((self.p_ns, self.d_data), (self.d_ns, self.p_data)):
            out = _ip("-n", ns, "route", "get", addr, check=False)
            if out.returncode != 0 or "dev" not in out.stdout:
                return False
        return True


def _free_subnet() -> int:
    """A third octet k such that no address of the root namespace is in 10.213.k.0/24."""
    used = _ip("-4", "-o", "addr", "show").stdout
    for i in range(250):
        k = (os.getpid() + i) % 250 + 1
        if f" 10.213.{k}." not in used:
            return k
    raise RuntimeError("no free 10.213.k.0/24 subnet in the root namespace")


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    why = _netns_unavailable()
    if why is not None:
        pytest.skip(why)
    pid = os.getpid()
    k = _free_subnet()
    n = Net(p_ns=f"mvp{pid}", d_ns=f"mvd{pid}", p_mgmt=f"10.213.{k}.2",
            d_mgmt=f"10.213.{k}.6", p_data=f"10.213.{k}.9", d_data=f"10.213.{k}.10",
            p_data_if=f"mvdp{pid}")
    root_ifs = [f"mvmp{pid}r", f"mvmd{pid}r"]  # root ends of the management pairs
    try:
        for ns in (n.p_ns, n.d_ns):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        # Management pairs: root <-> each namespace.
        for root_if, ns, root_addr, ns_addr in (
                (root_ifs[0], n.p_ns, f"10.213.{k}.1", n.p_mgmt),
                (root_ifs[1], n.d_ns, f"10.213.{k}.5", n.d_mgmt)):
            _ip("link", "add", root_if, "type", "veth", "peer", "name", "mgmt0", "netns", ns)
            _ip("addr", "add", f"{root_addr}/30", "dev", root_if)
            _ip("link", "set", root_if, "up")
            _ip("-n", ns, "addr", "add", f"{ns_addr}/30", "dev", "mgmt0")
            _ip("-n", ns, "link", "set", "mgmt0", "up")
        # The data pair: P's namespace <-> D's namespace, nothing else routes between them.
        _ip("-n", n.p_ns, "link", "add", n.p_data_if, "type", "veth", "peer", "name",
            "data0", "netns", n.d_ns)
        _ip("-n", n.p_ns, "addr", "add", f"{n.p_data}/30", "dev", n.p_data_if)
        _ip("-n", n.d_ns, "addr", "add", f"{n.d_data}/30", "dev", "data0")
        _ip("-n", n.p_ns, "link", "set", n.p_data_if, "up")
        _ip("-n", n.d_ns, "link", "set", "data0", "up")
        wait_for(n.data_link_up, 10, "the data link up")
        yield n
    finally:
        for ns in (n.p_ns, n.d_ns):  # deletes the interfaces inside, and so both pairs' ends
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for root_if in root_ifs:  # normally gone with their peers already
            subprocess.run(["ip", "link", "del", root_if], capture_output=True)


@pytest.fixture(scope="module")
def servers(net: Net, tiny_model: Path, logs_dir: Path) -> Iterator[dict[str, VllmServer]]:
    p = VllmServer(tiny_model, name="prefill", host=net.p_mgmt, netns=net.p_ns,
                   log_path=logs_dir / "n-prefill.log",
                   kv_transfer_config=kv_config("kv_producer", hostname=net.p_data,
                                                cluster_token=TOKEN, **P_SHORT))
    d = VllmServer(tiny_model, name="decode", host=net.d_mgmt, netns=net.d_ns,
                   log_path=logs_dir / "n-decode.log",
                   kv_transfer_config=kv_config("kv_consumer", hostname=net.d_data,
                                                cluster_token=TOKEN, **D_SHORT))
    try:
        start_all(p, d)
        yield {"prefill": p, "decode": d}
    finally:
        p.stop()
        d.stop()


@pytest.fixture(autouse=True)
def link_up_after(net: Net) -> Iterator[None]:
    """Whatever a test does, the next one starts with the data link up."""
    yield
    net.restore()


def _healthy(server: VllmServer) -> bool:
    try:
        with urllib.request.urlopen(server.url + "/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _timed(pool: cf.ThreadPoolExecutor, fn: Any, *args: Any) -> cf.Future:
    """fn(*args) in the pool; the future's `answered_at[0]` is when it returned or raised."""
    answered_at: list[float] = []

    def call() -> Any:
        try:
            return fn(*args)
        finally:
            answered_at.append(time.monotonic())
    fut = pool.submit(call)
    fut.answered_at = answered_at  # type: ignore[attr-defined]
    return fut


def _d_half(pool: cf.ThreadPoolExecutor, d: VllmServer, rc: dict[str, Any], prompt: list[int],
            max_tokens: int, tid: str, pipeline_tokens: int = 0) -> cf.Future:
    kv: dict[str, Any] = {"do_remote_prefill": True, "transfer_id": tid, "remote_control": rc}
    if pipeline_tokens:
        kv["pipeline_tokens"] = pipeline_tokens
    return _timed(pool, completion, d, prompt, max_tokens, sign_transfer_params(TOKEN, kv),
                  HANG_S)


def _p_half(pool: cf.ThreadPoolExecutor, p: VllmServer, prompt: list[int], tid: str,
            pipeline_tokens: int = 0) -> cf.Future:
    return _timed(pool, completion, p, prompt[:pipeline_tokens or len(prompt)], 1,
                  sign_transfer_params(TOKEN, {"do_remote_decode": True, "transfer_id": tid}),
                  HANG_S)


def _outcome(fut: cf.Future, started: float) -> tuple[str, Any, float]:
    """("ok", answer, seconds) or ("error", message, seconds), seconds from `started` to the
    answer; no answer HANG_S after `started` is a hang."""
    try:
        out: Any = fut.result(timeout=max(1.0, started + HANG_S - time.monotonic()))
        kind = "ok"
    except RuntimeError as e:  # the server's error answer
        kind, out = "error", str(e)
    except TimeoutError as e:  # concurrent.futures.TimeoutError is TimeoutError (3.11)
        if not fut.done():
            raise AssertionError(f"no answer {HANG_S:.0f}s after the request (a hang)") from None
        raise AssertionError(f"no answer within the client's timeout (a hang): {e!r}") from e
    return kind, out, fut.answered_at[0] - started  # type: ignore[attr-defined]


def _lines(server: VllmServer, needle: str) -> list[str]:
    return [ln for ln in log_text(server).splitlines() if needle in ln]


def _probe(p: VllmServer) -> dict[str, Any] | None:
    try:
        return probe_remote_control(p, TOKEN)
    except (AssertionError, RuntimeError, OSError):
        return None


def _served_and_drained(p: VllmServer, d: VllmServer, seed: int) -> None:
    """P/D requests are served again, equal to a single instance; both caches drain to 0.
    Seeds seed and seed + 1: prompt_ids with one seed share their head whatever the length,
    so no other prompt of this module may use them (D would hit its prefix cache)."""
    rc = wait_for(lambda: _probe(p), 30, "P's probe answered")
    for i in range(2):
        prompt = prompt_ids(150 + 40 * i, seed=seed + i)
        out = pd_completion(p, d, rc, prompt, 6, token=TOKEN)
        assert_same_greedy(completion(p, prompt, 6), out)
    wait_for(lambda: kv_usage(d) == 0.0 and kv_usage(p) == 0.0, BOUND_S,
             "both KV caches back to 0 usage (no block leaked)")


def _cut_during(servers: dict, net: Net, tid: str, prompt: list[int],
                pipeline_tokens: int = 0, p_half_after_cut: bool = False
                ) -> tuple[str, Any, float]:
    """A P/D request across a cut of the data link. Either both halves are sent together and
    the link is cut CUT_AFTER_S later (P is computing and writing), or (`p_half_after_cut`)
    D's half is sent, the link is cut once D has registered with P, and then P gets its half
    (P computes and writes into a dead link; D hears nothing more). While the link is down,
    plain requests on both servers are served (no thread or forward pass is stuck on the dead
    peer) and both answer /health. Returns D's outcome; the link is still down."""
    p, d = servers["prefill"], servers["decode"]
    rc = probe_remote_control(p, TOKEN)
    with cf.ThreadPoolExecutor(4) as pool:
        started = time.monotonic()
        fd = _d_half(pool, d, rc, prompt, 6, tid, pipeline_tokens)
        if p_half_after_cut:
            time.sleep(REGISTERED_S)
            net.cut()
            fp = _p_half(pool, p, prompt, tid, pipeline_tokens)
        else:
            fp = _p_half(pool, p, prompt, tid, pipeline_tokens)
            time.sleep(CUT_AFTER_S)
            net.cut()
        cut_at = time.monotonic() - started
        plain = {s.name: _timed(pool, completion, s, prompt_ids(40, seed=7), 3, None, 60.0)
                 for s in (p, d)}
        d_kind, d_out, d_s = _outcome(fd, started)
        p_kind, p_out, p_s = _outcome(fp, started)
        for name, f in plain.items():
            kind, out, took = _outcome(f, started + cut_at)
            assert kind == "ok", f"a plain request on {name} failed during the cut: {out}"
            print(f"plain request on {name} during the cut: {took:.1f}s")
            assert took < SLACK_S, f"a plain request on {name} took {took:.1f}s during the cut"
        assert net.data_link_up() is False, "the data link came back by itself"
        assert _healthy(p) and _healthy(d), "a server stopped answering /health during the cut"
    print(f"{tid}: cut at {cut_at:.2f}s; D: {d_kind} after {d_s:.1f}s; "
          f"P: {p_kind} after {p_s:.1f}s")
    assert p_kind == "ok", f"P's half failed: {p_out}"  # P answers once its prefill is done
    return d_kind, d_out, d_s


def _p_names_the_cause(p: VllmServer, tid: str) -> None:
    causes = ("decode never registered", "write to decode failed", "decode's wait of")
    wait_for(lambda: any(c in ln for ln in _lines(p, tid) for c in causes), BOUND_S,
             f"P's log naming a cause for transfer {tid} (one of {causes})")


def _no_health_alarm(*servers: VllmServer) -> None:
    for s in servers:
        bad = _lines(s, "is not healthy")
        assert not bad, f"{s.name}'s connector reported itself unhealthy: {bad}"


def test_signed_pd_over_the_data_link_equals_single_instance(servers: dict, net: Net) -> None:
    """P's control endpoint is its data address; a signed P/D request over the data link gives
    a single instance's greedy output and leaves both caches empty."""
    p, d = servers["prefill"], servers["decode"]
    rc = probe_remote_control(p, TOKEN)
    assert rc["control"][0].startswith(f"tcp://{net.p_data}:"), rc
    prompt = prompt_ids(150, seed=41)
    out = pd_completion(p, d, rc, prompt, 6, token=TOKEN)
    assert_same_greedy(completion(p, prompt, 6), out)
    assert "transfer_s=" in log_text(p)
    wait_for(lambda: kv_usage(d) == 0.0 and kv_usage(p) == 0.0, 30, "both caches idle")


def test_data_link_cut_mid_transfer_ends_within_deadlines(servers: dict, net: Net) -> None:
    """Cut while a long prompt's transfer is under way: D answers (an error under the fail
    policy, or the output if the KV made it) within its write horizon, both servers go on
    serving, both logs name the transfer and the cause; after the link is back, P/D requests
    are served again and no block is leaked on either side."""
    p, d = servers["prefill"], servers["decode"]
    prompt = prompt_ids(3000, seed=42)
    tid = "cut-" + uuid.uuid4().hex[:12]
    d_kind, d_out, d_s = _cut_during(servers, net, tid, prompt)
    assert d_s < BOUND_S, f"D answered {d_s:.1f}s after the request: {d_out}"
    if d_kind == "ok":  # the KV made it before the cut: then it is the right KV
        assert_same_greedy(completion(p, prompt, 6), d_out)
    else:
        wait_for(lambda: _lines(d, f"(transfer {tid}) failed:"), 10, "D's load failure logged")
        _p_names_the_cause(p, tid)
    print("D:", *_lines(d, tid), "P:", *_lines(p, tid), sep="\n  ")
    net.restore()
    wait_for(net.data_link_up, 10, "the data link up again")
    time.sleep(SETTLE_S)
    _served_and_drained(p, d, seed=43)
    _no_health_alarm(p, d)


def test_pipelined_request_across_a_cut(servers: dict, net: Net) -> None:
    """Pipelined (D's forward pass waits for P's layers, P repeats its progress while the
    head is queued): cut after D registered, then P gets the head. D's forward pass gives up
    after pipeline_silence_timeout_s without a word from P, long before the write horizon,
    and D goes on serving; its blocks come back by the horizon; P's writes into the dead link
    fail within its engine timeout; after the link is back the pair serves again and nothing
    leaks."""
    p, d = servers["prefill"], servers["decode"]
    prompt = prompt_ids(3000, seed=50)
    tid = "pipe-cut-" + uuid.uuid4().hex[:12]
    d_kind, d_out, d_s = _cut_during(servers, net, tid, prompt, pipeline_tokens=2048,
                                     p_half_after_cut=True)
    bound = REGISTERED_S + D_SHORT["pipeline_silence_timeout_s"] + SLACK_S
    assert d_kind == "error", f"D answered although P could not reach it: {d_out}"
    assert d_s < bound, f"D answered {d_s:.1f}s after the request (> {bound}s): {d_out}"
    silence = D_SHORT["pipeline_silence_timeout_s"]
    wait_for(lambda: [ln for ln in _lines(d, f"(transfer {tid}) failed: waiting for layer")
                      if f"no word from the prefill instance for {silence:.1f}s" in ln],
             10, "D's load failure logged with its cause (P fell silent)")
    _p_names_the_cause(p, tid)
    print("D:", *_lines(d, tid), "P:", *_lines(p, tid), sep="\n  ")
    net.restore()
    wait_for(net.data_link_up, 10, "the data link up again")
    time.sleep(SETTLE_S)
    _served_and_drained(p, d, seed=51)
    _no_health_alarm(p, d)
