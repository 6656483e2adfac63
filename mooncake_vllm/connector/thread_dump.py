"""What every thread of this process is doing, in a few lines: for a log line that has to
explain a stall after the fact (a transfer that should take milliseconds and takes seconds).
"""

from __future__ import annotations

import sys
import threading
import traceback


def thread_stacks(frames_per_thread: int = 4) -> str:
    """One line per thread: its name and its innermost frames (file:line function), outermost
    first."""
    names = {t.ident: t.name for t in threading.enumerate()}
    lines = []
    for ident, frame in sys._current_frames().items():
        stack = traceback.extract_stack(frame)[-frames_per_thread:]
        where = " < ".join(f"{s.filename.rsplit('/', 1)[-1]}:{s.lineno} {s.name}"
                           for s in reversed(stack))
        lines.append(f"[{names.get(ident, ident)}] {where}")
    return "; ".join(sorted(lines))
