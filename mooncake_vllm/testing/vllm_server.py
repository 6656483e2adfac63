"""Start and stop a real `vllm serve` process on loopback: for tests, the demo and benchmarks.

The server runs the same command a user types (`vllm serve MODEL ...`, the console script next
to this interpreter), so tests cover what users run. It is started by `testing.launcher`: its
output goes to a log file whose tail is quoted in every error, and stop() ends its whole
process group.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from mooncake_vllm.testing.launcher import Launched, LaunchError
from mooncake_vllm.testing.ports import free_port


def vllm_command() -> list[str]:
    """`vllm` from this interpreter's environment (what users type)."""
    script = Path(sys.executable).parent / "vllm"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vllm.entrypoints.cli.main"]


# Small, deterministic, CPU-friendly defaults. float32: bf16 picks an AMX kernel that dies with
# SIGILL on some hosts, and float32 avoids exact top-1/top-2 ties that flip with batch shape.
DEFAULT_ARGS: tuple[str, ...] = (
    "--dtype", "float32",
    "--max-model-len", "4096",
    "--block-size", "32",  # the CPU attention backend needs a multiple of 32
    "--seed", "0",
    # Eager mode starts in ~30 s instead of ~50-90 s (no torch.compile warm-up), same tokens.
    "--enforce-eager",
)
DEFAULT_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_LOGGING_LEVEL": "INFO",
    "TOKENIZERS_PARALLELISM": "false",
}


_started = itertools.count()


def _next_core() -> int:
    """Cores in turn for servers started without `cpus`.

    vLLM's CPU backend binds its OpenMP threads to cores itself, and its automatic choice is
    the same for every instance on a host (core 0 here). Several instances on core 0 spin
    against each other in OpenMP barriers: a 150-token prefill took 20 s instead of 50 ms
    while the other core idled. Spreading instances over the cores keeps each one fast.
    """
    cores = sorted(os.sched_getaffinity(0))
    return cores[next(_started) % len(cores)]


def omp_bind(cpus: Sequence[int], ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` tensor-parallel ranks on `cpus`: the cores split
    into one contiguous share per rank, `|` between ranks; with fewer cores than ranks, ranks
    take the cores in turn (sharing them)."""
    if ranks <= 1:
        return ",".join(map(str, cpus))
    if len(cpus) < ranks:
        return "|".join(str(cpus[r % len(cpus)]) for r in range(ranks))
    per = len(cpus) // ranks
    return "|".join(",".join(map(str, cpus[r * per:(r + 1) * per])) for r in range(ranks))


class VllmServer:
    """One `vllm serve` subprocess. Use as a context manager, or start()/wait_ready()/stop()."""

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        kv_transfer_config: dict[str, Any] | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        cpus: Sequence[int] | None = None,
        pin_process: bool = False,
        name: str = "vllm",
        netns: str | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        self.model = str(model)
        self.host = host
        # Run inside this network namespace (`ip netns exec NETNS vllm serve ...`, needs root):
        # fault tests give instances addresses of their own and cut the links between them.
        # `host` is then an address inside the namespace; this process must be able to reach
        # it (e.g. over a veth pair). A fresh namespace has every port free.
        self.netns = netns
        self.port = port or free_port(host if netns is None else "127.0.0.1")
        self.kv_transfer_config = kv_transfer_config
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.cpus = list(cpus) if cpus is not None else [_next_core()]
        # Off: only vLLM's compute threads are bound to `cpus`; its API server, engine core
        # and helper threads float. On: the whole process tree stays on `cpus` in a cpuset
        # (testing.cpuset), as on a machine of its own: no thread can widen its affinity.
        self.pin_process = pin_process
        self.name = name
        # One worker process per rank; `cpus` is shared out among them (omp_bind).
        self.tensor_parallel_size = tensor_parallel_size
        self.log_path = Path(log_path) if log_path else Path(f"/tmp/{name}-{self.port}.log")
        self.process: Launched | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [*vllm_command(), "serve", self.model, "--host", self.host, "--port", str(self.port)]
        if self.netns is not None:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        cmd += list(DEFAULT_ARGS)
        if self.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(self.tensor_parallel_size)]
        if self.kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(self.kv_transfer_config)]
        return cmd + self.extra_args

    def start(self) -> VllmServer:
        env = {**DEFAULT_ENV, **self.env}
        if self.cpus:
            # vLLM's CPU backend binds its OpenMP threads itself; tell it which cores are ours.
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                           omp_bind(self.cpus, self.tensor_parallel_size))
        self.process = Launched(
            self.command(), name=self.name, log_path=self.log_path, env=env,
            # A cpuset: the engine core, workers and every thread (the connector's too) stay.
            cpus=self.cpus if self.pin_process and self.cpus else None,
        ).start()
        return self

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return None if self.process is None else self.process.proc

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines) if self.process is not None else "(not started)"

    def poll_ready(self) -> bool:
        """One look at /health; LaunchError (with the log's tail) if the server exited."""
        if self.process is None:
            raise LaunchError(f"{self.name} was not started")
        return self.process.poll_http(self.url + "/health")

    def wait_ready(self, timeout_s: float = 240.0) -> VllmServer:
        if self.process is None:
            raise LaunchError(f"{self.name} was not started")
        self.process.wait_http(self.url + "/health", timeout_s)
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, for failure tests."""
        if self.process is not None:
            self.process.kill()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process is not None:
            self.process.stop(timeout_s)

    def __enter__(self) -> VllmServer:
        self.start()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def reset_prefix_caches(urls: Sequence[str]) -> None:
    """Empty each instance's prefix cache (vLLM's dev-mode route: VLLM_SERVER_DEV_MODE=1)."""
    for url in urls:
        req = urllib.request.Request(url + "/reset_prefix_cache", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            if r.status != 200:
                raise RuntimeError(f"{url}/reset_prefix_cache answered {r.status}")


def post_json(url: str, body: dict[str, Any], timeout_s: float = 120.0) -> dict[str, Any]:
    """POST a JSON body and return the decoded answer; errors carry the server's message."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return dict(json.loads(r.read()))
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"POST {url} -> {e.code}: {e.read().decode(errors='replace')}") from e
