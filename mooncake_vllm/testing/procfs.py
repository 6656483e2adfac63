"""Process facts from /proc/PID/stat, for the launcher and the benchmarks' load accounting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

# Indexes into the fields after "pid (comm) ": state, ppid, pgrp, ... flags, ... utime, stime.
STATE, PGRP, FLAGS, UTIME, STIME = 0, 2, 6, 11, 12
PF_EXITING = 0x4  # the kernel is tearing the process down (include/linux/sched.h)


def stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name; None when it has exited."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    return text[text.rindex(")") + 2:].split()


def all_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields) of every process alive now."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(entry.name)
            if fields is not None:
                yield int(entry.name), fields


def cpu_jiffies(fields: list[str]) -> int:
    """User plus system time, in clock ticks."""
    return int(fields[UTIME]) + int(fields[STIME])


def exiting(pid: int) -> bool:
    """Whether the process is gone or being torn down by the kernel (past any signal)."""
    fields = stat_fields(pid)
    return fields is None or bool(int(fields[FLAGS]) & PF_EXITING)


def describe(pid: int) -> str:
    """One line on where a process is: its name, state, kernel wait channel, and whether it is
    exiting, for messages about processes that do not go."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        wchan = Path(f"/proc/{pid}/wchan").read_text().strip() or "-"
    except OSError:
        return f"{pid} (gone)"
    fields = stat_fields(pid)
    if fields is None:
        return f"{pid} (gone)"
    state = "exiting, " if int(fields[FLAGS]) & PF_EXITING else ""
    return f"{pid} ({name}: {state}state {fields[STATE]}, waiting in {wchan})"
