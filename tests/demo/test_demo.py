"""The README's demo, end to end: real etcd, three real `vllm serve` processes, the conductor.

One run of `python -m mooncake_vllm.demo` (what `make demo` runs): it must exit 0, every
answer must match the single instance's, KV must have moved, and nothing it started may be
left running or listening afterwards.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_demo_runs_end_to_end_and_matches_a_single_instance(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "mooncake_vllm.demo", "--workdir", str(workdir),
         "--max-tokens", "16"],
        capture_output=True, text=True, timeout=1100,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]

    n_prompts = len(re.findall(r"^\[\d+\] ", proc.stdout, flags=re.M))
    assert n_prompts >= 5, out[-3000:]
    assert proc.stdout.count("    MATCH (") == n_prompts, out[-3000:]
    assert f"{n_prompts}/{n_prompts} answers match the single vLLM instance" in proc.stdout

    moved = re.search(r"KV moved prefill -> decode: ([\d.]+) MiB sent, ([\d.]+) MiB received, "
                      r"(\d+) transfers", proc.stdout)
    assert moved is not None, out[-3000:]
    sent, received, transfers = float(moved[1]), float(moved[2]), int(moved[3])
    assert sent > 0 and transfers >= n_prompts, moved[0]
    assert received == pytest.approx(sent), moved[0]
    assert re.search(r"exposed transfer time .*: [\d.]+ ms average over \d+ requests",
                     proc.stdout), out[-3000:]

    # Clean shutdown: every server it announced is gone, and no process uses its work dir.
    urls = re.findall(r"(?:prefill|decode|single|conductor) ready at (http://[\d.:]+)", out)
    assert len(urls) == 4, out[-3000:]
    assert [u for u in urls if _listening(u)] == []
    assert _processes_mentioning(str(workdir)) == []
