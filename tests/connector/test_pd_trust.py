"""The trust boundary on real vLLM instances with a cluster token: what a client or a stranger
on the network can make them do (nothing but be refused), and secure-by-default start-up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from mooncake_vllm.connector import messages as m
from mooncake_vllm.security import FrameAuth, sign_transfer_params
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
TOKEN = "trust-test-token-" + uuid.uuid4().hex
OTHER_TOKEN = "another-cluster-" + uuid.uuid4().hex
V = m.PROTOCOL_VERSION


def _routable_ipv4() -> str | None:
    """An address of this machine that is not loopback, if it has one."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            return parts[parts.index("inet") + 1].split("/")[0]
    return None


@pytest.fixture(scope="module")
def servers(tiny_model: Path, logs_dir: Path) -> Iterator[dict[str, VllmServer | None]]:
    exposed = None
    ip = _routable_ipv4()
    if ip is not None:  # listens on a routable address with no token: must refuse to start
        exposed = VllmServer(tiny_model, name="exposed", log_path=logs_dir / "t-exposed.log",
                             kv_transfer_config=kv_config("kv_consumer", hostname=ip))
        exposed.start()
    # Advertises a wildcard address (peers would be told to connect to 0.0.0.0): must refuse.
    wildcard = VllmServer(tiny_model, name="wildcard", log_path=logs_dir / "t-wildcard.log",
                          kv_transfer_config=kv_config("kv_consumer", hostname="0.0.0.0",
                                                       cluster_token=TOKEN))
    wildcard.start()
    # A decode instance of another cluster (another token), sent to this cluster's prefill.
    stranger = VllmServer(tiny_model, name="stranger", log_path=logs_dir / "t-stranger.log",
                          kv_transfer_config=kv_config("kv_consumer", cluster_token=OTHER_TOKEN))
    # This cluster's token, another KV block size than the prefill's.
    odd = VllmServer(tiny_model, name="odd-blocks", log_path=logs_dir / "t-odd-blocks.log",
                     kv_transfer_config=kv_config("kv_consumer", cluster_token=TOKEN),
                     extra_args=["--block-size", "64"])
    p = VllmServer(tiny_model, name="prefill", log_path=logs_dir / "t-prefill.log",
                   kv_transfer_config=kv_config("kv_producer", cluster_token=TOKEN))
    d = VllmServer(tiny_model, name="decode", log_path=logs_dir / "t-decode.log",
                   kv_transfer_config=kv_config("kv_consumer", cluster_token=TOKEN))
    try:
        start_all(p, d, stranger, odd)
        yield {"prefill": p, "decode": d, "exposed": exposed, "wildcard": wildcard,
               "stranger": stranger, "odd": odd}
    finally:
        for s in (p, d, exposed, wildcard, stranger, odd):
            if s is not None:
                s.stop()


def test_signed_pd_equals_single_instance(servers: dict) -> None:
    p, d = servers["prefill"], servers["decode"]
    rc = probe_remote_control(p, TOKEN)
    prompt = prompt_ids(150, seed=31)
    out = pd_completion(p, d, rc, prompt, 6, token=TOKEN)
    assert_same_greedy(completion(p, prompt, 6), out)
    assert "transfer_s=" in log_text(p)


def test_client_written_transfer_params_are_refused(servers: dict) -> None:
    """A client that sends kv_transfer_params itself (no conductor signature) gets a plain
    answer: D computes the prompt itself, P holds nothing for anyone."""
    p, d = servers["prefill"], servers["decode"]
    rc = probe_remote_control(p, TOKEN)
    prompt = prompt_ids(120, seed=32)
    out = completion(d, prompt, 6, {"do_remote_prefill": True, "transfer_id": "client-d",
                                    "remote_control": rc})
    assert_same_greedy(completion(p, prompt, 6), out)
    answer = completion(p, prompt, 1, {"do_remote_decode": True, "transfer_id": "client-p"})
    assert not (answer.get("kv_transfer_params") or {}).get("remote_control")
    for server in (d, p):
        wait_for(lambda s=server: "kv_transfer_params refused (kv_transfer_params carry no "
                 "conductor signature" in log_text(s), 10, "the refusal logged")
    assert "client-d" not in log_text(p)  # D never registered anything with P


def test_strangers_on_the_control_port_change_nothing(servers: dict) -> None:
    p, d = servers["prefill"], servers["decode"]
    rc = probe_remote_control(p, TOKEN)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(rc["control"][0])
    try:
        layout = m.LayoutInfo("x", 32, "float32", 1, 1, 1, 4, 0, 1, [[(0, 4)]])
        for i in range(3000):  # unsigned registrations, each with a p2p descriptor
            s.send(m.encode(m.Register(V, f"junk-{i}", "e", "s", {"endpoint": "x" * 100},
                                       layout, 0, list(range(100)), 3200)))
        s.send(b"\x92garbage")
        s.send(m.encode(m.Release(V, "anything", "forged")))
        s.send(b"\0" * (m.MAX_FRAME_BYTES + 1))
        # A probe signed with the token is answered: the worker is healthy.
        auth = FrameAuth(TOKEN)
        s2 = ctx.socket(zmq.DEALER)
        s2.setsockopt(zmq.LINGER, 0)
        s2.connect(rc["control"][0])
        s2.send(auth.seal(m.encode(m.Ping(V, "probe-1"))))
        assert s2.poll(10000), "no answer to a signed Ping"
        pong = m.decode(auth.open(s2.recv()))
        s2.close(linger=0)
        assert isinstance(pong, m.Pong) and pong.healthy and pong.transfer_id == "probe-1"
    finally:
        s.close(linger=0)
    wait_for(lambda: "bad MAC" in log_text(p), 10, "unsigned frames refused")
    prompt = prompt_ids(140, seed=33)
    assert_same_greedy(completion(p, prompt, 5), pd_completion(p, d, rc, prompt, 5,
                                                               token=TOKEN))
    assert "junk-1" not in log_text(p)  # no registration was ever looked at


def _refused_to_start(server: VllmServer) -> str:
    """Its log, once it has exited without ever serving."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and server.proc is not None \
            and server.proc.poll() is None:
        time.sleep(1)
    with socket.socket() as probe:
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0, "it serves anyway"
    return log_text(server)


def test_routable_address_without_a_token_refuses_to_start(servers: dict) -> None:
    exposed = servers["exposed"]
    if exposed is None:
        pytest.skip("this machine has no non-loopback IPv4 address to listen on")
    text = _refused_to_start(exposed)
    assert "is not a loopback address and no cluster_token is set" in text


def test_an_address_peers_cannot_use_refuses_to_start(servers: dict) -> None:
    text = _refused_to_start(servers["wildcard"])
    assert "hostname='0.0.0.0': a wildcard address is what a server binds to" in text


def test_a_decode_with_another_token_fails_at_first_contact(servers: dict) -> None:
    """Its registration reaches a prefill of another cluster: the prefill refuses the frame and
    says so, and the decode instance fails the request at once, naming cluster_token, instead
    of waiting out its transfer timeout; its blocks come back."""
    p, stranger = servers["prefill"], servers["stranger"]
    rc = probe_remote_control(p, TOKEN)
    kv = sign_transfer_params(OTHER_TOKEN, {"do_remote_prefill": True,
                                            "transfer_id": uuid.uuid4().hex,
                                            "remote_control": rc})
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="-> 500"):
        completion(stranger, prompt_ids(64, seed=35), 4, kv)
    assert time.monotonic() - started < 15, "waited for a deadline instead"
    assert "the two instances' cluster_token differ" in log_text(stranger)
    assert "its cluster_token is not this instance's?" in log_text(p)
    wait_for(lambda: kv_usage(stranger) == 0, 10, "the stranger's blocks freed")


def test_a_block_size_mismatch_is_named_by_the_doctor_and_at_first_contact(
        servers: dict) -> None:
    """Prefill with 32-token blocks, decode with 64: the doctor names the key and both values
    and exits 1; a request sent anyway fails at once, the decode's log naming both values."""
    p, odd = servers["prefill"], servers["odd"]
    run = subprocess.run([sys.executable, "-m", "mooncake_vllm.cli", "doctor", "--prefill", p.url,
                          "--decode", odd.url], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "MOONCAKE_VLLM_CLUSTER_TOKEN": TOKEN})
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL layout" in run.stdout and "block_size is 32 on prefill but 64 on decode" in \
        run.stdout, run.stdout
    assert "fix: start both with the same --block-size" in run.stdout
    rc = probe_remote_control(p, TOKEN)
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="-> 500"):
        pd_completion(p, odd, rc, prompt_ids(100, seed=37), 4, token=TOKEN)
    assert time.monotonic() - started < 15, "waited for a deadline instead"
    assert "block_size is 32 on prefill but 64 on decode" in log_text(odd)
    wait_for(lambda: kv_usage(odd) == 0, 10, "the decode's blocks freed")
