"""Helpers shared by the engine tests: byte patterns, digests, engines in this process or in
a child process (peer_process.py)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mooncake_vllm.engine import TransferEngine

PEER_SCRIPT = Path(__file__).with_name("peer_process.py")


def pattern(length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8)


def sha256(array: np.ndarray) -> str:
    return hashlib.sha256(array.tobytes()).hexdigest()


class PeerProcess:
    """An engine with one registered buffer, in a child process."""

    def __init__(
        self,
        size: int,
        token: str | None = None,
        timeout_s: float = 10.0,
        port: int = 0,
        remote_read: bool = False,
        idle_timeout_s: float = 120.0,
        max_connections: int = 256,
        max_per_address: int = 64,
    ) -> None:
        cmd = [sys.executable, str(PEER_SCRIPT), "--size", str(size), "--timeout", str(timeout_s)]
        cmd += ["--port", str(port), "--idle-timeout", str(idle_timeout_s)]
        cmd += ["--max-connections", str(max_connections)]
        cmd += ["--max-per-address", str(max_per_address)]
        if token:
            cmd += ["--token", token]
        if remote_read:
            cmd += ["--remote-read"]
        # The engine logs to stderr; a file (not a pipe) so that a chatty peer never blocks.
        self._log = tempfile.NamedTemporaryFile(prefix="peer-", suffix=".log")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            bufsize=1,
        )
        hello = self._read()
        self.descriptor: dict[str, Any] = hello["descriptor"]
        self.base: int = hello["base"]
        self.size = size

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"peer process exited with {self.proc.wait(timeout=5)}")
        return json.loads(line)

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def log(self) -> str:
        """Everything the peer's engine logged so far."""
        return Path(self._log.name).read_text(errors="replace")

    def rss_kib(self) -> int:
        return int(self.call(cmd="rss")["rss_kib"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def endpoint(self) -> tuple[str, int]:
        host, port = self.descriptor["endpoint"].rsplit(":", 1)
        return host, int(port)

    def digest(self, offset: int, length: int) -> str:
        return str(self.call(cmd="digest", offset=offset, length=length)["sha256"])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call(cmd="quit")
                self.proc.wait(timeout=10)
            except (OSError, RuntimeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)


class LocalEngine:
    """An engine in this process with one registered numpy buffer."""

    def __init__(self, size: int, remote_read: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("protocol", "tcp")
        kwargs.setdefault("timeout_s", 10.0)
        self.engine = TransferEngine(**kwargs)
        self.buffer = np.zeros(size, dtype=np.uint8)
        self.base = self.buffer.ctypes.data
        self.engine.register(self.base, self.buffer.nbytes, remote_read=remote_read)

    def close(self) -> None:
        self.engine.close()
