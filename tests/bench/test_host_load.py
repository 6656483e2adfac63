"""`bench serve` tells its own CPU time from other load: real processes, real /proc."""

from __future__ import annotations

import os
import subprocess
import sys

from mooncake_vllm.bench.host_load import (
    NOISY_SHARE,
    ForeignLoad,
    group_jiffies,
    machine_jiffies,
    shares,
)

TICK = os.sysconf("SC_CLK_TCK")
# Burns this much CPU time, says so, then waits to be stopped.
BURN = ("import sys, time\n"
        "while time.process_time() < 0.4: pass\n"
        "print('burnt', flush=True)\n"
        "sys.stdin.read()\n")


def test_group_time_is_the_groups_cpu_time_and_the_machine_saw_it() -> None:
    busy_before = sum(machine_jiffies())
    child = subprocess.Popen([sys.executable, "-c", BURN], start_new_session=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "burnt\n"
        own = group_jiffies({child.pid})
        assert 0.35 * TICK <= own <= 1.5 * TICK, own  # its 0.4 s, plus interpreter start
        assert group_jiffies({child.pid + 10_000_000}) == 0  # no such group
        assert sum(machine_jiffies()) - busy_before >= 0.35 * TICK
        # A window over the burnt child counts nothing of it: it is ours and idle now.
        window = ForeignLoad({child.pid}).start()
        result = window.stop()
        assert set(result) == {"foreign_cpu_share", "steal_share", "window_s", "noisy"}
        assert min(result["foreign_cpu_share"], result["steal_share"]) >= 0
    finally:
        child.kill()
        child.wait(timeout=10)


def test_a_window_is_noisy_above_the_share() -> None:
    assert not shares(NOISY_SHARE / 2, 0.0, 10.0)["noisy"]
    assert shares(NOISY_SHARE / 2, NOISY_SHARE, 10.0)["noisy"]  # steal counts too
