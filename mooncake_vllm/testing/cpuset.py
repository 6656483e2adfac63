"""Confine a process, its threads and its children to given cores: for tests and benchmarks.

A cgroup v1 cpuset of our own (`/sys/fs/cgroup/cpuset/mooncake-vllm-...`, root needed) holds
the process from before it runs its first instruction: the command is started through a shell
that moves itself into the cpuset and then `exec`s it. Unlike `taskset`, a cpuset cannot be
widened from inside: the connector calls `sched_setaffinity` to unpin its I/O threads, and in a
cpuset the kernel intersects that mask with the cpuset's cores. Children inherit the cpuset
even when they leave the process group. The cpuset is removed when the process is stopped.

Where cpusets are unavailable (not root, no cgroup v1 cpuset hierarchy) `Confinement` falls back to
`sched_setaffinity` before `exec` and its `note` says so: threads can then widen their affinity.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

CPUSET_ROOT = Path("/sys/fs/cgroup/cpuset")
_PREFIX = "mooncake-vllm"
_created = itertools.count()

# The shell moves itself ($$) into the cpuset, then becomes the command: the command's first
# instruction already runs confined, so no thread it starts can begin outside.
_ENTER_CPUSET = 'echo $$ > "$0" && exec "$@"'
_SET_AFFINITY = (
    "import os, sys; os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(',')}); "
    "os.execvp(sys.argv[2], sys.argv[2:])"
)


class CpusetError(RuntimeError):
    """A cpuset could not be made, filled or removed; the message names the path and cause."""


def parse_cpu_list(text: str) -> set[int]:
    """The kernel's list format ("0-3,8,10-11") as a set of core numbers."""
    cores: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cores.update(range(int(lo), int(hi or lo) + 1))
    return cores


def _own_cpuset(root: Path) -> Path:
    """The cpuset this process is in: ours are made inside it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, rel = line.split(":", 2)
            if "cpuset" in controllers.split(","):
                return root / rel.lstrip("/")
    return root


def unavailable_reason(root: Path | None = None) -> str | None:
    """Why cpusets cannot be used here, or None when they can."""
    root = root or CPUSET_ROOT
    if os.geteuid() != 0:
        return "not running as root"
    parent = _own_cpuset(root)
    if not (parent / "cpuset.cpus").is_file():
        return f"no cgroup v1 cpuset hierarchy at {root}"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None


class Cpuset:
    """One cpuset directory of ours, made on construction, removed by `remove()`."""

    def __init__(self, cpus: Sequence[int], *, label: str, root: Path | None = None) -> None:
        parent = _own_cpuset(root or CPUSET_ROOT)
        self.cpus = sorted(set(cpus))
        allowed = parse_cpu_list((parent / "cpuset.effective_cpus").read_text())
        if not self.cpus or not set(self.cpus) <= allowed:
            raise CpusetError(f"cpus={list(cpus)} must be a non-empty subset of the cores "
                              f"{sorted(allowed)} of {parent}")
        _remove_stale(parent)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:40]
        self.path = parent / f"{_PREFIX}-{os.getpid()}-{next(_created)}-{safe}"
        try:
            self.path.mkdir()
            (self.path / "cpuset.cpus").write_text(",".join(map(str, self.cpus)))
            mems = (parent / "cpuset.effective_mems").read_text().strip()
            (self.path / "cpuset.mems").write_text(mems)
        except OSError as e:
            with contextlib.suppress(OSError):
                self.path.rmdir()
            raise CpusetError(f"cannot make cpuset {self.path} for cpus={self.cpus}: {e}") from e

    def command(self, cmd: Sequence[str]) -> list[str]:
        """`cmd`, started inside this cpuset."""
        return ["/bin/sh", "-c", _ENTER_CPUSET, str(self.path / "cgroup.procs"), *cmd]

    def pids(self) -> list[int]:
        """Every process in the cpuset (children that left the process group included)."""
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def remove(self, timeout_s: float = 5.0) -> None:
        """rmdir, once the processes in it are gone (exiting ones take a moment to leave)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if time.monotonic() >= deadline:
                    raise CpusetError(f"cannot remove cpuset {self.path} (processes still in "
                                      f"it: {self.pids()}): {e}") from e
                time.sleep(0.05)


def _remove_stale(parent: Path) -> None:
    """Empty cpusets left by a process of ours that died without removing them."""
    for path in parent.glob(f"{_PREFIX}-*"):
        owner = path.name.split("-")[2]
        if owner.isdigit() and not Path(f"/proc/{owner}").exists():
            with contextlib.suppress(OSError):
                path.rmdir()  # fails while processes are in it: then it is not stale


class Confinement:
    """How a launched command is kept on its cores: a cpuset, or affinity where none can be had.

    `note` says which, for logs and results."""

    def __init__(self, cpus: Sequence[int], *, label: str, root: Path | None = None) -> None:
        self.cpus = sorted(set(cpus))
        reason = unavailable_reason(root)
        self.cpuset = None if reason is not None else Cpuset(self.cpus, label=label, root=root)
        cores = ",".join(map(str, self.cpus))
        if self.cpuset is not None:
            self.note = f"cores {cores} by cpuset {self.cpuset.path}"
        else:
            self.note = (f"cores {cores} by sched_setaffinity only (no cpuset: {reason}); "
                         "threads can widen their affinity")

    def command(self, cmd: Sequence[str]) -> list[str]:
        if self.cpuset is not None:
            return self.cpuset.command(cmd)
        return [sys.executable, "-c", _SET_AFFINITY, ",".join(map(str, self.cpus)), *cmd]

    def pids(self) -> list[int]:
        return self.cpuset.pids() if self.cpuset is not None else []

    def release(self) -> None:
        if self.cpuset is not None:
            self.cpuset.remove()
