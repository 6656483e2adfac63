"""The subprocess launcher and cpuset confinement, on real processes (no vLLM: seconds).

The affinity test is the reason cpusets exist here: a child that widens its own affinity (as
the connector does for its I/O threads) stays on its cores in a cpuset, and does not under
plain sched_setaffinity, which is what the fallback and `taskset` give.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mooncake_vllm.testing import cpuset
from mooncake_vllm.testing.launcher import Launched, LaunchError, answers_any
from mooncake_vllm.testing.ports import free_port
from mooncake_vllm.testing.procfs import describe, exiting

ALL_CORES = sorted(os.sched_getaffinity(0))
needs_two_cores = pytest.mark.skipif(len(ALL_CORES) < 2, reason="needs two cores")
needs_cpusets = pytest.mark.skipif(cpuset.unavailable_reason() is not None,
                                   reason=f"cpusets unavailable: {cpuset.unavailable_reason()}")

# Widens its affinity to every core from the main thread, from a new thread, and in a child
# process (which widens its own), then reports what each ended with and exits.
WIDEN = textwrap.dedent("""
    import json, os, subprocess, sys, threading
    every = set(range(os.cpu_count()))
    def widen():
        os.sched_setaffinity(0, every)
        return sorted(os.sched_getaffinity(0))
    out = {"main": widen()}
    th = threading.Thread(target=lambda: out.update(thread=widen())); th.start(); th.join()
    child = subprocess.run([sys.executable, "-c", "import os; "
        "os.sched_setaffinity(0, set(range(os.cpu_count()))); "
        "print(sorted(os.sched_getaffinity(0)))"], capture_output=True, text=True)
    out["child"] = json.loads(child.stdout)
    print("RESULT " + json.dumps(out), flush=True)
""")


def _run_to_end(proc: Launched) -> dict[str, list[int]]:
    proc.start()
    assert proc.wait_exit(60) == 0, proc.log_tail()
    line = next(ln for ln in proc.log_path.read_text().splitlines() if ln.startswith("RESULT "))
    proc.stop()
    return dict(json.loads(line.removeprefix("RESULT ")))


@needs_two_cores
@needs_cpusets
def test_a_child_cannot_widen_its_affinity_past_its_cpuset(tmp_path: Path) -> None:
    core = ALL_CORES[-1]
    proc = Launched([sys.executable, "-c", WIDEN], name="widen", log_path=tmp_path / "w.log",
                    cpus=[core])
    result = _run_to_end(proc)
    assert result == {"main": [core], "thread": [core], "child": [core]}, proc.log_tail()
    assert "by cpuset" in proc.confinement_note
    assert not any(Path(cpuset.CPUSET_ROOT).glob(f"*-{os.getpid()}-*-widen")), "not removed"


# A thread widens its affinity and stays alive, so that thread_cores() sees it.
WIDEN_AND_STAY = textwrap.dedent("""
    import os, threading, time
    def widen():
        os.sched_setaffinity(0, set(range(os.cpu_count())))
        print("CHILD 0", flush=True)
        time.sleep(600)
    threading.Thread(target=widen, daemon=True).start()
    time.sleep(600)
""")


@needs_two_cores
@needs_cpusets
def test_thread_cores_shows_every_thread_on_the_cpusets_cores(tmp_path: Path) -> None:
    core = ALL_CORES[-1]
    proc = Launched([sys.executable, "-c", WIDEN_AND_STAY], name="stay",
                    log_path=tmp_path / "s.log", cpus=[core]).start()
    try:
        _child_pid(proc)
        cores = proc.thread_cores()
        assert len(cores) >= 2 and all(c == {core} for c in cores.values()), cores
    finally:
        proc.stop()


@needs_two_cores
def test_without_cpusets_affinity_is_a_fallback_that_threads_can_widen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpuset, "CPUSET_ROOT", tmp_path / "no-cgroup")
    proc = Launched([sys.executable, "-c", WIDEN], name="widen", log_path=tmp_path / "w.log",
                    cpus=[ALL_CORES[0]])
    result = _run_to_end(proc)
    assert result["main"] == ALL_CORES  # what a cpuset prevents
    assert "sched_setaffinity only (no cpuset: " in proc.confinement_note
    assert proc.confinement_note.splitlines()[0] in proc.log_path.read_text()

    stay = Launched([sys.executable, "-c", WIDEN_AND_STAY], name="stay",
                    log_path=tmp_path / "s.log", cpus=[ALL_CORES[0]]).start()
    try:
        _child_pid(stay)
        assert set(ALL_CORES) in stay.thread_cores().values()  # thread_cores() sees it
    finally:
        stay.stop()


def test_cores_outside_ours_are_refused_naming_them(tmp_path: Path) -> None:
    if cpuset.unavailable_reason() is not None:
        pytest.skip("cpusets unavailable")
    with pytest.raises(cpuset.CpusetError, match=r"cpus=\[4096\]"):
        Launched(["true"], name="x", log_path=tmp_path / "x.log", cpus=[4096]).start()


def test_early_exit_is_reported_with_the_log_tail(tmp_path: Path) -> None:
    proc = Launched([sys.executable, "-c", "print('bad flag --frobnicate'); raise SystemExit(3)"],
                    name="broken", log_path=tmp_path / "b.log").start()
    with pytest.raises(LaunchError, match=r"(?s)broken exited with 3 .*bad flag --frobnicate"):
        proc.wait_http(f"http://127.0.0.1:{free_port()}/health", timeout_s=30)


def test_a_server_that_never_answers_times_out_quoting_its_log(tmp_path: Path) -> None:
    proc = Launched([sys.executable, "-c", "print('still loading', flush=True); "
                     "import time; time.sleep(60)"], name="slow", log_path=tmp_path / "s.log")
    proc.start()
    try:
        started = time.monotonic()
        with pytest.raises(LaunchError, match=r"(?s)did not answer .* within 1 s.*still loading"):
            proc.wait_http(f"http://127.0.0.1:{free_port()}/health", timeout_s=1)
        assert time.monotonic() - started < 10
    finally:
        proc.stop()


def test_wait_http_returns_once_the_server_answers(tmp_path: Path) -> None:
    port = free_port()
    proc = Launched([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                    name="http", log_path=tmp_path / "h.log").start()
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/no-such-page", timeout_s=30,
                       accept=answers_any)  # a 404 is an answer
        assert proc.running
    finally:
        proc.stop()
    assert not proc.running


# A group leader that ignores SIGTERM, with a grandchild that also ignores it.
STUBBORN = textwrap.dedent("""
    import signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('child up', flush=True); "
        "time.sleep(600)"])
    print(f"CHILD {child.pid}", flush=True)
    time.sleep(600)
""")


def _child_pid(proc: Launched) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in proc.log_path.read_text().splitlines():
            if line.startswith("CHILD "):
                return int(line.split()[1])
        time.sleep(0.05)
    raise AssertionError(proc.log_tail())


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_stop_kills_the_whole_group_after_the_term_deadline(tmp_path: Path) -> None:
    proc = Launched([sys.executable, "-c", STUBBORN], name="stubborn",
                    log_path=tmp_path / "s.log").start()
    child = _child_pid(proc)
    started = time.monotonic()
    proc.stop(timeout_s=1.0)
    assert 1.0 <= time.monotonic() - started < 10
    assert proc.returncode == -signal.SIGKILL
    assert not _alive(child)


@needs_cpusets
def test_stop_also_ends_children_that_left_the_group(tmp_path: Path) -> None:
    """A child in a session of its own is no longer in the group, but still in the cpuset."""
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(600)'], start_new_session=True); "
            "print(f'CHILD {c.pid}', flush=True); time.sleep(600)")
    proc = Launched([sys.executable, "-c", code], name="escapee", log_path=tmp_path / "e.log",
                    cpus=ALL_CORES[:1]).start()
    child = _child_pid(proc)
    proc.stop(timeout_s=5.0)
    assert not _alive(child)


def test_kill_sends_no_sigterm_first(tmp_path: Path) -> None:
    code = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (print("
            "'got SIGTERM', flush=True), sys.exit(0))); print('CHILD 0', flush=True); "
            "time.sleep(600)")
    proc = Launched([sys.executable, "-c", code], name="crash", log_path=tmp_path / "c.log")
    proc.start()
    _child_pid(proc)
    proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert "got SIGTERM" not in proc.log_path.read_text().splitlines()


def test_cpu_seconds_tell_a_busy_process_from_an_idle_one(tmp_path: Path) -> None:
    up = "print('CHILD 0', flush=True)\n"  # started: its interpreter's start-up is over
    busy = Launched([sys.executable, "-c", up + "while True: pass"], name="busy",
                    log_path=tmp_path / "b.log").start()
    idle = Launched([sys.executable, "-c", up + "import time; time.sleep(600)"], name="idle",
                    log_path=tmp_path / "i.log").start()
    try:
        _child_pid(busy), _child_pid(idle)
        before = busy.cpu_seconds(), idle.cpu_seconds()
        time.sleep(2.0)
        used = busy.cpu_seconds() - before[0], idle.cpu_seconds() - before[1]
        # The machine may be shared: the busy one gets a fair part of a core, not all of it.
        assert used[0] > 0.2 and used[1] < 0.02, used
    finally:
        busy.stop()
        idle.stop()
    assert busy.pids() == set()


def test_a_process_that_does_not_go_is_described_by_state_and_wait() -> None:
    """What a 'still alive after SIGKILL' failure says about each process left."""
    proc = subprocess.Popen(["sleep", "30"])
    try:
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.2)
        told = describe(proc.pid)
        assert told.startswith(f"{proc.pid} (sleep: state T, waiting in "), told
        assert not exiting(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    assert describe(proc.pid) == f"{proc.pid} (gone)" and exiting(proc.pid)
