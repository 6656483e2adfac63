"""P and D on one host with vLLM's default core binding (issue 12).

Both instances are started as a user would start them: no core list, so no
VLLM_CPU_OMP_THREADS_BIND, and vLLM's "auto" binding gives both the same cores. Once such a
pair stalled on its very first request. Here:

- every fresh start serves a 200-token request and then a burst of 8, each within a few
  seconds, each answer equal to P serving the same prompt alone;
- the instance that starts second warns that its cores are shared, naming the fix;
- D's worker uses little CPU while a request waits for KV that P does not send (the
  connector makes such steps wait on the transfer instead of spinning).

Fresh starts: MOONCAKE_VLLM_TEST_SHARED_HOST_ROUNDS (default 1, which CI runs: one pair,
shared by the three tests, about 1.5 minutes on a 2-core box). The issue's bar is ten in a
row: run with =10 by hand (rounds 1..9 each start a pair of their own first).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mooncake_vllm.testing.vllm_server import VllmServer

from .pd import (
    assert_same_greedy,
    completion,
    kv_config,
    log_text,
    pd_completion,
    probe_remote_control,
    prompt_ids,
    start_all,
)

pytestmark = pytest.mark.vllm

ROUNDS = int(os.environ.get("MOONCAKE_VLLM_TEST_SHARED_HOST_ROUNDS", "1"))
# "Within a few seconds each": the stall this guards against lasted over a minute. The first
# request of a fresh pair also pays both instances' first forward passes and the connections'
# set-up (about 3 s on a 2-core box), so the bound leaves room for a loaded CI host.
FIRST_REQUEST_S = 8.0
BURST_S = 8.0
SHARED_WARNING = "are shared. Instances that share cores spin against each other"


def unpinned(model: Path, name: str, log: Path, role: str) -> VllmServer:
    """A server started as a user would: no core list, so no VLLM_CPU_OMP_THREADS_BIND."""
    assert "VLLM_CPU_OMP_THREADS_BIND" not in os.environ
    return VllmServer(model, name=name, log_path=log, cpus=[],
                      kv_transfer_config=kv_config(role, transfer_timeout_s=30))


def start_pair(model: Path, logs: Path, tag: str) -> tuple[VllmServer, VllmServer]:
    p = unpinned(model, "prefill", logs / f"shared-{tag}-prefill.log", "kv_producer")
    d = unpinned(model, "decode", logs / f"shared-{tag}-decode.log", "kv_consumer")
    start_all(p, d)
    return p, d


@pytest.fixture(scope="module")
def pair(tiny_model: Path, logs_dir: Path) -> Iterator[tuple[VllmServer, VllmServer]]:
    p, d = start_pair(tiny_model, logs_dir, "0")
    try:
        yield p, d
    finally:
        p.stop()
        d.stop()


def first_request_and_burst(p: VllmServer, d: VllmServer, round_no: int) -> str:
    rc = probe_remote_control(p)
    first = prompt_ids(200, seed=1200 + round_no)
    t0 = time.monotonic()
    got = pd_completion(p, d, rc, first, max_tokens=8)
    first_s = time.monotonic() - t0
    burst = [prompt_ids(60 + 23 * i, seed=1300 + 10 * round_no + i) for i in range(8)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        burst_got = list(pool.map(lambda pr: pd_completion(p, d, rc, pr, 8), burst))
    burst_s = time.monotonic() - t0
    where = (f"round {round_no} (host load average {os.getloadavg()[0]:.1f}): logs "
             f"{p.log_path}, {d.log_path}")
    assert first_s < FIRST_REQUEST_S, f"first request took {first_s:.1f}s; {where}"
    assert burst_s < BURST_S, f"burst of 8 took {burst_s:.1f}s; {where}"
    assert_same_greedy(completion(p, first, 8), got)
    for prompt, answer in zip(burst, burst_got, strict=True):
        assert_same_greedy(completion(p, prompt, 8), answer)
    assert "KV load for request" not in log_text(d), where
    assert "write to decode failed" not in log_text(p), where
    return f"round {round_no}: first request {first_s:.2f}s, burst of 8 {burst_s:.2f}s"


@pytest.mark.skipif(ROUNDS < 2, reason="one fresh start (the shared pair below) unless "
                    "MOONCAKE_VLLM_TEST_SHARED_HOST_ROUNDS asks for more")
def test_more_fresh_unpinned_pairs_serve_first_request_and_burst(tiny_model: Path,
                                                                 logs_dir: Path) -> None:
    """Rounds 1..N-1, each on a pair of its own, before the shared pair below starts."""
    for round_no in range(1, ROUNDS):
        p, d = start_pair(tiny_model, logs_dir, str(round_no))
        try:
            print(first_request_and_burst(p, d, round_no))
        finally:
            p.stop()
            d.stop()


def test_fresh_unpinned_pair_serves_first_request_and_burst(
        pair: tuple[VllmServer, VllmServer]) -> None:
    print("\n" + first_request_and_burst(*pair, 0))


def test_an_instance_sharing_cores_says_so_with_the_fix(
        pair: tuple[VllmServer, VllmServer]) -> None:
    warned = [line for s in pair for line in log_text(s).splitlines() if SHARED_WARNING in line]
    assert warned, "neither instance warned that it shares its cores with the other"
    assert "VLLM_CPU_OMP_THREADS_BIND=0 here and VLLM_CPU_OMP_THREADS_BIND=1 on the other" \
        in warned[0] or os.cpu_count() != 2, warned[0]


def cpu_s_by_process(leader_pid: int) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process in the leader's group, by
    process name (vLLM names them: VLLM::EngineCore, VLLM::Worker_...)."""
    out: dict[str, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == leader_pid:  # pgrp
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf(
                "SC_CLK_TCK")  # utime, stime
    return out


def test_decode_waiting_for_kv_does_not_spin(pair: tuple[VllmServer, VllmServer]) -> None:
    """A request on D whose prefill half never reaches P: D registers and waits for KV (P
    keeps the registration, as for a request still in its queue). Over a few seconds of that
    wait D's worker, whose model thread shares P's OpenMP cores, uses a small part of one
    core: its steps wait on the transfer instead of returning at once.

    Not asserted, printed: the engine core process. While the worker waits, vLLM's engine
    core waits for the worker's answer in a shared-memory queue whose reader spins
    (sched_yield) for a second after each message; that thread gives way to any other
    runnable thread, but its spinning counts as CPU time."""
    p, d = pair
    rc = probe_remote_control(p)
    assert d.proc is not None
    kv = {"do_remote_prefill": True, "transfer_id": uuid.uuid4().hex, "remote_control": rc}

    def waiting_request() -> None:
        # The client gives up (a timeout): vLLM then aborts the request.
        with contextlib.suppress(OSError):
            completion(d, prompt_ids(100, seed=77), 4, kv, timeout_s=6.0)

    client = threading.Thread(target=waiting_request, daemon=True)
    client.start()
    time.sleep(1.5)  # scheduled, blocks allocated, registration sent: now it waits
    before, t0 = cpu_s_by_process(d.proc.pid), time.monotonic()
    time.sleep(3.0)
    after, window_s = cpu_s_by_process(d.proc.pid), time.monotonic() - t0
    client.join(timeout=30)
    share = {name: (after[name] - before.get(name, 0.0)) / window_s for name in after}
    print("\nD while it waits for KV, share of one core: "
          + ", ".join(f"{name} {used:.0%}" for name, used in sorted(share.items())))
    worker = sum(used for name, used in share.items() if name.startswith("VLLM::Worker"))
    assert worker < 0.30, f"D's worker used {worker:.0%} of a core waiting for KV; {share}"
