"""The conductor (`mooncake-vllm proxy`) as a subprocess: for tests, the demo and benchmarks,
which thereby run the command users type. (`proxy.conductor.Conductor` is the conductor itself,
in-process; this is a process running it.)

    with ConductorProcess(["--prefill", p.url, "--decode", d.url]) as conductor:
        conductor.wait_healthy(30)      # /health 200: an instance is in rotation
        post_json(conductor.url + "/v1/completions", ...)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from mooncake_vllm.testing.launcher import Launched, answers_any, cli_command
from mooncake_vllm.testing.ports import free_port


class ConductorProcess:
    """`mooncake-vllm proxy --host 127.0.0.1 --port N ARGS...` in a process group of its own."""

    def __init__(self, args: Sequence[str], *, port: int | None = None,
                 log_path: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None,
                 cpus: Sequence[int] | None = None) -> None:
        self.port = port or free_port()
        self.args = list(args)
        self.log_path = Path(log_path or f"/tmp/mooncake-conductor-{self.port}.log")
        command = [*cli_command("proxy"), "--host", "127.0.0.1", "--port", str(self.port),
                   *self.args]
        self.process = Launched(command, name="conductor", log_path=self.log_path, env=env,
                                cpus=cpus)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> ConductorProcess:
        """Start and wait until it listens (any answer on /metrics; it may see no instance)."""
        self.process.start()
        try:
            self.process.wait_http(self.url + "/metrics", timeout_s, accept=answers_any)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout_s: float) -> ConductorProcess:
        """Until /health answers 200: at least one instance is in rotation."""
        self.process.wait_http(self.url + "/health", timeout_s)
        return self

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

    def stop(self, timeout_s: float = 15.0) -> None:
        self.process.stop(timeout_s)

    def __enter__(self) -> ConductorProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
