"""Instances on one CPU host that compute on the same cores: say so at start, with the fix.

vLLM binds a CPU instance's OpenMP threads to cores it chooses itself, and its automatic
choice is the same for every instance on a host: a prefill and a decode instance started with
default settings then spin against each other in OpenMP barriers, and each runs many times
slower than alone. Every connector worker on the CPU platform leaves a small record (pid,
cores, instance) in a per-host directory while it runs; at start it reads the others' and
logs a WARNING naming each live instance whose cores overlap its own, the shared cores and
the setting that separates them. Records of processes that are gone are ignored (and removed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger("vllm.mooncake_vllm.connector")


def records_dir() -> Path:
    """One directory per host: /dev/shm is shared by every process of the host (and emptied at
    boot), else $XDG_RUNTIME_DIR, else the temp directory."""
    for base in ("/dev/shm", os.environ.get("XDG_RUNTIME_DIR", ""), tempfile.gettempdir()):
        if base and os.access(base, os.W_OK):
            return Path(base) / "mooncake-vllm"
    return Path(tempfile.gettempdir()) / "mooncake-vllm"


def compute_cpus() -> list[int]:
    """The cores this process's OpenMP threads run on: what vLLM set for them (OMP_PLACES,
    GOMP_CPU_AFFINITY or KMP_AFFINITY's proclist), else every core this thread may use."""
    env = os.environ
    text = env.get("OMP_PLACES") or env.get("GOMP_CPU_AFFINITY") or ""
    if not text:
        found = re.search(r"proclist=\[([^\]]*)\]", env.get("KMP_AFFINITY", ""))
        text = found.group(1) if found else ""
    cpus = sorted({c for part in re.findall(r"\d+(?:-\d+)?", text) for c in _span(part)})
    return cpus or sorted(os.sched_getaffinity(0))


def _span(part: str) -> range:
    lo, _, hi = part.partition("-")
    return range(int(lo), int(hi or lo) + 1)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot: a pid reused later differs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def cpu_list(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (the form VLLM_CPU_OMP_THREADS_BIND takes)."""
    out: list[str] = []
    for c in sorted(cpus):
        if out and out[-1].split("-")[-1] == str(c - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)


@dataclass(frozen=True)
class CoreRecord:
    pid: int
    started: str
    instance_id: str
    engine_id: str  # the vLLM instance: its tensor-parallel workers share it
    role: str
    cpus: list[int]


def shared_cores_warning(mine: CoreRecord, other: CoreRecord) -> str | None:
    """The warning for two instances whose cores overlap; None when they do not."""
    shared = sorted(set(mine.cpus) & set(other.cpus))
    if not shared:
        return None
    both = sorted(set(mine.cpus) | set(other.cpus))
    here, there = both[:max(1, len(both) // 2)], both[max(1, len(both) // 2):] or both
    return (f"MooncakeVllmConnector: this instance ({mine.instance_id}, {mine.role}, pid "
            f"{mine.pid}) computes on cores {cpu_list(mine.cpus)}, and so does instance "
            f"{other.instance_id} ({other.role}, pid {other.pid}) on cores "
            f"{cpu_list(other.cpus)}: cores {cpu_list(shared)} are shared. Instances that share "
            "cores spin against each other and each runs many times slower (vLLM binds every "
            "CPU instance to the same cores unless told otherwise). Give each its own cores, "
            f"e.g. VLLM_CPU_OMP_THREADS_BIND={cpu_list(here)} here and "
            f"VLLM_CPU_OMP_THREADS_BIND={cpu_list(there)} on the other instance")


class CoreRegistry:
    """This process's record in the per-host directory, and the check against the others."""

    def __init__(self, instance_id: str, engine_id: str, role: str,
                 directory: Path | None = None) -> None:
        self.directory = directory or records_dir()
        pid = os.getpid()
        self.record = CoreRecord(pid, _start_time(pid), instance_id, engine_id, role,
                                 compute_cpus())
        self.path = self.directory / f"{pid}.json"

    def announce(self) -> list[str]:
        """Write our record, then warn about every live instance sharing our cores; returns
        the warnings. Best effort: a directory we cannot use costs the check, not the start."""
        try:
            self.directory.mkdir(mode=0o1777, parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(asdict(self.record)))
            tmp.replace(self.path)
        except OSError as e:
            logger.info("MooncakeVllmConnector: cannot leave a core record in %s (%s); "
                        "shared cores are not checked", self.directory, e)
            return []
        warnings = []
        for other in self._others():
            why = shared_cores_warning(self.record, other)
            if why is not None:
                logger.warning("%s", why)
                warnings.append(why)
        return warnings

    def _others(self) -> list[CoreRecord]:
        out = []
        for path in sorted(self.directory.glob("*.json")):
            if path == self.path:
                continue
            try:
                rec = CoreRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # being written, or not ours
            if _start_time(rec.pid) != rec.started:  # gone (or its pid reused)
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)
                continue
            if rec.engine_id != self.record.engine_id:  # not a worker of this instance
                out.append(rec)
        return out

    def withdraw(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink(missing_ok=True)
