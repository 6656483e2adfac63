"""How much of the machine something other than the benchmark took while a system was measured.

Systems are measured one after the other, so a neighbour that comes or goes between them
skews every ratio. `ForeignLoad` reads the machine's busy time (/proc/stat) at the start and
end of a window and subtracts the CPU time of the benchmark's own processes (this process and
the process groups of the servers, conductors and relays it started): what is left was used
by other processes. Steal time (a virtual machine's host running something else on our vCPUs)
is reported apart. Both are shares of the window's wall time times the cores.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mooncake_vllm.testing.procfs import PGRP, all_stats, cpu_jiffies

# A window in which others used more than this share of the machine is called noisy.
NOISY_SHARE = 0.10
_TICK = os.sysconf("SC_CLK_TCK")


def machine_jiffies() -> tuple[int, int]:
    """(busy excluding steal, steal) jiffies of all cores since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def group_jiffies(pgids: Iterable[int]) -> int:
    """CPU time (user + system) of the live processes of these process groups."""
    wanted = set(pgids)
    return sum(cpu_jiffies(fields) for pid, fields in all_stats()
               if int(fields[PGRP]) in wanted and pid != os.getpid())


def _own_jiffies(pgids: Iterable[int]) -> int:
    times = os.times()
    return round((times.user + times.system) * _TICK) + group_jiffies(pgids)


class ForeignLoad:
    """A measuring window: `start()`, then `stop()` returns the shares others used."""

    def __init__(self, pgids: Iterable[int]) -> None:
        self.pgids = set(pgids)
        self.cores = len(os.sched_getaffinity(0))

    def start(self) -> ForeignLoad:
        self.t0 = time.monotonic()
        self.busy0, self.steal0 = machine_jiffies()
        self.own0 = _own_jiffies(self.pgids)
        return self

    def stop(self) -> dict[str, Any]:
        wall = time.monotonic() - self.t0
        busy, steal = machine_jiffies()
        own = _own_jiffies(self.pgids)
        capacity = wall * _TICK * self.cores
        foreign = max(0, (busy - self.busy0) - (own - self.own0))
        return shares(foreign / capacity if capacity else 0.0,
                      (steal - self.steal0) / capacity if capacity else 0.0, wall)


def shares(foreign: float, steal: float, wall_s: float) -> dict[str, Any]:
    return {"foreign_cpu_share": round(foreign, 4), "steal_share": round(steal, 4),
            "window_s": round(wall_s, 3), "noisy": foreign + steal > NOISY_SHARE}


def combined(windows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Several measuring windows of one system as one: shares weighted by their lengths."""
    ws = list(windows)
    wall = sum(w["window_s"] for w in ws)
    if not wall:
        return shares(0.0, 0.0, 0.0)
    return shares(sum(w["foreign_cpu_share"] * w["window_s"] for w in ws) / wall,
                  sum(w["steal_share"] * w["window_s"] for w in ws) / wall, wall)
