"""Start a command as a process group of its own, wait for it to answer HTTP, stop it.

The one subprocess launcher of the tests, the demo and the benchmarks (vLLM servers, etcd, the
conductor). Output goes to a log file whose tail is quoted in every error, because "it did not
come up" says nothing without it. Stopping signals the whole group (vLLM's engine core and
workers too) with SIGTERM, then SIGKILL after a deadline, and waits until no process of it is
left. With `cpus` the command runs confined to those cores (`testing.cpuset`).

    proc = Launched(["etcd", ...], name="etcd", log_path=workdir / "etcd.log")
    proc.start().wait_http("http://127.0.0.1:2379/health", timeout_s=20)
    ...
    proc.stop()
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from mooncake_vllm.testing.cpuset import Confinement, parse_cpu_list
from mooncake_vllm.testing.procfs import (
    PGRP,
    STATE,
    all_stats,
    cpu_jiffies,
    describe,
    exiting,
    stat_fields,
)


def cli_command(subcommand: str) -> list[str]:
    """`mooncake-vllm SUBCOMMAND` from this interpreter's environment (what users type)."""
    script = Path(sys.executable).parent / "mooncake-vllm"
    if script.exists():
        return [str(script), subcommand]
    return [sys.executable, "-m", "mooncake_vllm.cli", subcommand]


class LaunchError(RuntimeError):
    """A launched command exited early, did not become ready, or could not be stopped; the
    message names it and quotes its log's tail."""


def answers_200(status: int) -> bool:
    return status == 200


def answers_any(status: int) -> bool:
    """Any HTTP answer: the server listens (readiness before it has anything to serve)."""
    return True


class Launched:
    """One command in its own process group, its output in `log_path`."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        name: str,
        log_path: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cpus: Sequence[int] | None = None,
        append_log: bool = False,
    ) -> None:
        self.command = list(command)
        self.name = name
        self.log_path = Path(log_path)
        self.env = dict(env or {})  # on top of this process' environment
        self.cpus = sorted(set(cpus)) if cpus is not None else None
        # Restarts (etcd) keep one log: each start appends a header with its command.
        self.append_log = append_log
        self.proc: subprocess.Popen[bytes] | None = None
        self._confinement: Confinement | None = None
        self.confinement_note = "not confined"

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def pids(self) -> set[int]:
        """Its live processes: the group's, and its cpuset's (children that left the group)."""
        return self._members() if self.proc is not None else set()

    def cpu_seconds(self) -> float:
        """CPU time (user + system, every thread) its live processes have used so far: the
        difference over an interval says whether it worked or idled meanwhile."""
        tick = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.pids():
            fields = stat_fields(pid)
            if fields is not None:  # else it exited meanwhile
                total += cpu_jiffies(fields)
        return total / tick

    def thread_cores(self) -> dict[int, set[int]]:
        """The cores each thread of its live processes may run on, by thread id: shows whether
        any thread left the cores it was given (one that widened its own affinity)."""
        out = {}
        for pid in self.pids():
            for status in Path(f"/proc/{pid}/task").glob("*/status"):
                try:
                    text = status.read_text()
                except OSError:
                    continue  # the thread ended meanwhile
                for line in text.splitlines():
                    if line.startswith("Cpus_allowed_list:"):
                        out[int(status.parent.name)] = parse_cpu_list(line.split(":", 1)[1])
        return out

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def _failure(self, what: str) -> LaunchError:
        return LaunchError(f"{self.name} {what}; log {self.log_path}:\n{self.log_tail()}")

    # ------------------------------------------------------------------ start / wait
    def start(self) -> Launched:
        if self.running:
            return self
        self.stop()  # an earlier run's children and cpuset, if it exited by itself
        command = self.command
        if self.cpus is not None:
            self._confinement = Confinement(self.cpus, label=self.name)
            self.confinement_note = self._confinement.note
            command = self._confinement.command(command)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab" if self.append_log else "wb") as log:
            log.write(f"===== {' '.join(self.command)}\n===== {self.confinement_note}\n".encode())
            log.flush()
            try:
                self.proc = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env={**os.environ, **self.env},
                    start_new_session=True,  # its own process group: stop() reaches them all
                )
            except OSError as e:
                self._release()
                raise LaunchError(f"{self.name}: cannot run {self.command[0]!r}: {e}") from e
        return self

    def poll_http(self, url: str, accept: Callable[[int], bool] = answers_200,
                  ssl_context: ssl.SSLContext | None = None) -> bool:
        """One look: does `url` answer with an accepted status? Raises if the process exited."""
        if self.proc is None:
            raise LaunchError(f"{self.name} was not started")
        if self.proc.poll() is not None:
            raise self._failure(f"exited with {self.proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2, context=ssl_context) as resp:
                return accept(resp.status)
        except urllib.error.HTTPError as e:
            return accept(e.code)
        except (urllib.error.URLError, OSError):
            return False

    def wait_http(self, url: str, timeout_s: float, accept: Callable[[int], bool] = answers_200,
                  ssl_context: ssl.SSLContext | None = None) -> Launched:
        """Until `url` answers with an accepted status; LaunchError (with the log's tail) when
        the process exits first or `timeout_s` passes. The process is left as it is."""
        deadline = time.monotonic() + timeout_s
        while not self.poll_http(url, accept, ssl_context):
            if time.monotonic() >= deadline:
                raise self._failure(f"did not answer {url} within {timeout_s:.0f} s")
            time.sleep(0.1)
        return self

    def wait_exit(self, timeout_s: float) -> int:
        """The exit status, once the process has exited by itself within `timeout_s`."""
        if self.proc is None:
            raise LaunchError(f"{self.name} was not started")
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise self._failure(f"still running after {timeout_s:.0f} s") from None

    # ------------------------------------------------------------------ stop
    def stop(self, timeout_s: float = 30.0, kill_timeout_s: float = 10.0) -> None:
        """SIGTERM to the group; SIGKILL to what is left after `timeout_s`; return once no
        process of the group (or of its cpuset) is left. Safe to call more than once."""
        if self.proc is None:
            return
        if self._members():
            self._signal_all(signal.SIGTERM)
            if not self._wait_gone(timeout_s):
                self._signal_all(signal.SIGKILL)
                self._wait_killed(kill_timeout_s)
        self._release()

    def kill(self, timeout_s: float = 10.0) -> None:
        """SIGKILL at once, no SIGTERM first: a crash, for failure tests."""
        if self.proc is None:
            return
        self._signal_all(signal.SIGKILL)
        self._wait_killed(timeout_s)
        self._release()

    def _wait_killed(self, timeout_s: float) -> None:
        """After SIGKILL: until the processes are gone. One the kernel is still tearing down
        (releasing its memory on a loaded host can take long) is given a minute more; one
        that is not even exiting is an error, described."""
        if self._wait_gone(timeout_s):
            return
        if all(exiting(pid) for pid in self._members()) and self._wait_gone(60.0):
            return
        left = ", ".join(describe(pid) for pid in sorted(self._members()))
        raise self._failure(f"processes still alive {timeout_s:.0f} s after SIGKILL: {left}")

    def _members(self) -> set[int]:
        assert self.proc is not None
        self.proc.poll()  # reaps the leader: a zombie is no member
        pids = set(_group_members(self.proc.pid))
        if self._confinement is not None:
            pids.update(self._confinement.pids())
        return pids

    def _signal_all(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        # Children that left the group are still in the cpuset.
        for pid in self._confinement.pids() if self._confinement is not None else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self._members():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def _release(self) -> None:
        if self._confinement is not None:
            self._confinement.release()
            self._confinement = None


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    return [pid for pid, fields in all_stats()
            if fields[STATE] != "Z" and int(fields[PGRP]) == pgid]

