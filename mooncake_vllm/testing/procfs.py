"""Process facts from /proc/PID/stat, for the launcher and the benchmarks' load accounting."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

# Indexes into the fields after "pid (comm) ": state, ppid, pgrp, ... utime, stime.
STATE, PGRP, UTIME, STIME = 0, 2, 11, 12


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
