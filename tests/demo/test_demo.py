"""The README's demo, end to end: real etcd, three real `vllm serve` processes, the conductor.

One run of `python -m mooncake_vllm.demo` (what `make demo` runs): it must exit 0, every
answer must match the single instance's, KV must have moved, and nothing it started may be
left running or listening afterwards.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mooncake_vllm.testing import cpuset

pytestmark = [pytest.mark.vllm, pytest.mark.etcd, pytest.mark.timeout(1200)]


def _listening(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) == 0


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(f"{cmdline.parent.name}: {args[:200]}")
    return found


ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\S+)\s+([\d.]+)ms\s+([\d.]+)ms\s+[\d.]+\s+[\d.]+\s+"
                 r"(\S+)\s+(yes|NO)$", flags=re.M)
MOVES_KV = ("disaggregated", "pipelined")


def test_demo_runs_end_to_end_and_matches_a_single_instance(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mooncake_vllm.demo", "--workdir", str(workdir),
         "--max-tokens", "16"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    stdout, stderr = proc.communicate(timeout=1100)
    out = stdout + stderr
    assert proc.returncode == 0, out[-6000:]

    n_prompts = len(re.findall(r"^\[\d+\] ", stdout, flags=re.M))
    assert n_prompts >= 5, out[-3000:]
    assert stdout.count("    MATCH (") == n_prompts, out[-3000:]
    assert f"{n_prompts}/{n_prompts} answers match the single vLLM instance" in stdout

    # One table row per prompt: the conductor's path, and KV write times where KV moved.
    rows = ROW.findall(stdout)
    assert len(rows) == n_prompts, out[-3000:]
    paths = [r[2] for r in rows]
    assert all(p in ("disaggregated", "local", "pipelined") for p in paths), paths
    # Two passes over the same prompts: the defaults' choice, then every one through P and D
    # (whatever the defaults chose on this host, the KV path is exercised and checked).
    assert n_prompts % 2 == 0 and "disaggregates every one" in stdout, out[-3000:]
    assert paths[n_prompts // 2:] == ["disaggregated"] * (n_prompts // 2), paths
    assert all((r[5] != "-") == (r[2] in MOVES_KV) for r in rows), rows
    moved = re.search(r"KV moved prefill -> decode: ([\d.]+) MiB sent, ([\d.]+) MiB received, "
                      r"(\d+) transfers", stdout)
    assert moved is not None, out[-3000:]
    sent, received, transfers = float(moved[1]), float(moved[2]), int(moved[3])
    assert transfers == sum(p in MOVES_KV for p in paths) >= 1, (moved[0], paths)
    assert sent > 0 and received == pytest.approx(sent), moved[0]
    assert re.search(r"exposed transfer time .*: [\d.]+ ms average over \d+ requests: "
                     r"[\d.]+ ms before decode asked for the KV, [\d.]+ ms with writes under way",
                     stdout), out[-3000:]
    assert "random weights" in stdout and "What this shows:" in stdout
    # The KV pool: asked again with both caches emptied, P read the prompt back from it.
    pool = re.search(r"KV pool: prompt of (\d+) tokens .*: (\d+) tokens of its KV read back "
                     r".* answer MATCH", stdout)
    assert pool is not None and 0 < int(pool[2]) < int(pool[1]), out[-3000:]

    # Each instance on its own core(s), in a cpuset where this host has them.
    if len(os.sched_getaffinity(0)) >= 2 and cpuset.unavailable_reason() is None:
        for name in ("prefill", "decode", "single"):
            assert re.search(rf"{name} on cores [\d,]+ by cpuset ", stdout), out[-3000:]
        # The connector widens its I/O threads' affinity; in a cpuset they stay anyway.
        threads = re.search(r"threads on their instance's cores: (\d+) of (\d+)$", stdout,
                            flags=re.M)
        assert threads is not None and threads[1] == threads[2] != "0", out[-3000:]

    # Clean shutdown: every server it announced is gone, no process uses its work dir, and
    # its cpusets are removed.
    urls = re.findall(r"(?:prefill|decode|single|conductor|store) ready at (http://[\d.:]+)",
                      out)
    assert len(urls) == 6, out[-3000:]  # three vLLM instances, two conductors, a store
    assert [u for u in urls if _listening(u)] == []
    assert _processes_mentioning(str(workdir)) == []
    assert list(cpuset.CPUSET_ROOT.glob(f"mooncake-vllm-{proc.pid}-*")) == []
