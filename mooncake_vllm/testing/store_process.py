"""A pool node (`mooncake-vllm store`) as a subprocess: for tests, the demo and benchmarks,
which thereby run the command users type.

    with StoreProcess(etcd.url, name="s1", dram_mib=64) as store:
        status = store.status()          # its /status
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from mooncake_vllm.testing.launcher import Launched, LaunchError, cli_command
from mooncake_vllm.testing.ports import free_port


class StoreProcess:
    def __init__(self, metadata_url: str, *, name: str, dram_mib: float = 64,
                 ssd_path: Path | None = None, ssd_mib: float = 0, slot_bytes: int = 1 << 16,
                 args: Sequence[str] = (), log_path: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None, cpus: Sequence[int] | None = None,
                 status_port: int | None = None) -> None:
        self.name = name
        self.status_port = status_port or free_port()
        self.log_path = Path(log_path or f"/tmp/mooncake-store-{name}-{self.status_port}.log")
        command = [*cli_command("store"), "--metadata-server", metadata_url, "--name", name,
                   "--hostname", "127.0.0.1", "--dram-gib", str(dram_mib / 1024),
                   "--slot-bytes", str(slot_bytes), "--status-port", str(self.status_port),
                   *args]
        if ssd_path is not None:
            command += ["--ssd-path", str(ssd_path), "--ssd-gib", str(ssd_mib / 1024)]
        self.process = Launched(command, name=f"store {name}", log_path=self.log_path, env=env,
                                cpus=cpus, append_log=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.status_port}"

    def start(self, timeout_s: float = 30.0) -> StoreProcess:
        self.process.start()
        try:
            self.process.wait_http(self.url + "/health", timeout_s)
            # The port was free when picked; the node's own "ready" line says that it is the
            # one answering there (not another process that took the port meanwhile).
            deadline = time.monotonic() + timeout_s
            while f"ready: {self.url}" not in self.log_tail(400):
                if time.monotonic() > deadline or not self.process.running:
                    raise LaunchError(f"store {self.name}: no 'ready: {self.url}' line in "
                                      f"{self.log_path}:\n{self.log_tail()}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/status", timeout=5) as r:
            return dict(json.load(r))

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines)

    def stop(self, timeout_s: float = 15.0) -> None:
        self.process.stop(timeout_s)

    def kill(self) -> None:
        self.process.kill()

    def __enter__(self) -> StoreProcess:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
