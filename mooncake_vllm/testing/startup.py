"""Bringing several vLLM servers up and down together, telling a person what is happening:
for the demo and the benchmarks, where engines load for a minute or more."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mooncake_vllm.testing.launcher import LaunchError
from mooncake_vllm.testing.vllm_server import VllmServer


class Progress:
    """Timestamped lines, counted from construction."""

    def __init__(self, stream: Any = sys.stdout) -> None:
        self.t0 = time.monotonic()
        self.stream = stream

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=self.stream, flush=True)


_LEVELS = ("INFO", "WARNING", "ERROR")


def last_log_line(path: Path, width: int = 60) -> str:
    """The newest line vLLM logged, shortened: shows what a loading engine is doing."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines()]
    except OSError:
        return "starting"
    # vLLM's own lines look like "(EngineCore pid=7) INFO 11-25 06:20:01 [file.py:12] msg";
    # the rest (library warnings, stack frames) says little about progress.
    logged = [ln for ln in lines if any(f" {lvl} " in ln for lvl in _LEVELS) and "] " in ln]
    if not logged:
        return "starting"
    text = logged[-1].split("] ", 1)[1]
    return text if len(text) <= width else text[: width - 3] + "..."


def wait_all_ready(servers: Sequence[VllmServer], progress: Progress, timeout_s: float,
                   heartbeat_s: float = 5.0) -> None:
    """Wait for every server's /health, saying as each comes up and, every few seconds, what
    the ones still loading are doing. LaunchError (with the logs' tails) when one exits or
    `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    pending = list(servers)
    next_beat = time.monotonic() + heartbeat_s
    while pending:
        for server in [s for s in pending if s.poll_ready()]:
            pending.remove(server)
            progress.say(f"{server.name} ready at {server.url}")
        if not pending:
            return
        now = time.monotonic()
        if now > deadline:
            names = ", ".join(s.name for s in pending)
            tails = "\n".join(f"--- {s.name} ({s.log_path}):\n{s.log_tail(15)}" for s in pending)
            raise LaunchError(f"not ready after {timeout_s:.0f} s: {names}\n{tails}")
        if now >= next_beat:
            progress.say("loading: " + "".join(
                f"\n           {s.name:>8}: {last_log_line(s.log_path)}" for s in pending))
            next_beat = now + heartbeat_s
        time.sleep(0.5)


def stop_in_parallel(servers: Sequence[VllmServer]) -> None:
    """Stop servers at once, not one after another: each may take seconds to wind down."""
    # 10 s of grace: an engine still loading may not react to SIGTERM; it holds no state.
    errors: list[BaseException] = []

    def stop(server: VllmServer) -> None:
        try:
            server.stop(10.0)
        except LaunchError as e:
            errors.append(e)

    threads = [threading.Thread(target=stop, args=(s,), name=f"stop-{s.name}") for s in servers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise LaunchError("; ".join(map(str, errors)))
