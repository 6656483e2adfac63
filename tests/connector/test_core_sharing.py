"""Core records on one host: a worker warns about live instances that share its cores.

Real processes stand in for the other instance (their pid and start time are what a record
is checked against); the check with two real vLLM instances is in test_shared_host.py.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from mooncake_vllm.connector.core_sharing import CoreRecord, CoreRegistry, _start_time, cpu_list


@pytest.fixture
def other_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def _leave_record(directory: Path, pid: int, cpus: list[int], engine_id: str = "other") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rec = CoreRecord(pid, _start_time(pid), "inst-other", engine_id, "kv_producer", cpus)
    path = directory / f"{pid}.json"
    path.write_text(json.dumps(asdict(rec)))
    return path


def test_warns_naming_the_other_instance_shared_cores_and_fix(
        tmp_path: Path, other_process: subprocess.Popen[bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_PLACES", "{0,1}")
    _leave_record(tmp_path, other_process.pid, [0, 1])
    mine = CoreRegistry("inst-me", "mine", "kv_consumer", directory=tmp_path)
    [warning] = mine.announce()
    assert f"pid {other_process.pid}" in warning and "inst-other" in warning
    assert "cores 0-1 are shared" in warning
    assert ("VLLM_CPU_OMP_THREADS_BIND=0 here and VLLM_CPU_OMP_THREADS_BIND=1 on the other"
            in warning)
    assert json.loads(mine.path.read_text())["cpus"] == [0, 1]
    mine.withdraw()
    assert not mine.path.exists()


def test_no_warning_for_separate_cores_or_the_same_instance(
        tmp_path: Path, other_process: subprocess.Popen[bytes],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_PLACES", "{1}")
    _leave_record(tmp_path, other_process.pid, [0])
    assert CoreRegistry("inst-me", "mine", "kv_consumer", directory=tmp_path).announce() == []
    _leave_record(tmp_path, other_process.pid, [1], engine_id="mine")  # our other TP rank
    assert CoreRegistry("inst-me", "mine", "kv_consumer", directory=tmp_path).announce() == []


def test_records_of_processes_that_are_gone_are_ignored_and_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_PLACES", "{0}")
    proc = subprocess.Popen(["sleep", "60"])
    stale = _leave_record(tmp_path, proc.pid, [0])
    proc.kill()
    proc.wait()
    assert CoreRegistry("inst-me", "mine", "kv_consumer", directory=tmp_path).announce() == []
    assert not stale.exists()


def test_a_reused_pid_is_not_the_recorded_instance(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_PLACES", "{0}")
    parent = os.getppid()  # alive, but not the process that wrote the record
    rec = CoreRecord(parent, "1", "inst-old", "old", "kv_producer", [0])
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / f"{parent}.json").write_text(json.dumps(asdict(rec)))
    assert CoreRegistry("inst-me", "mine", "kv_consumer", directory=tmp_path).announce() == []


def test_cores_from_each_openmp_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from mooncake_vllm.connector.core_sharing import compute_cpus

    for key in ("OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("KMP_AFFINITY", "granularity=fine,explicit,proclist=[2,3,5]")
    assert compute_cpus() == [2, 3, 5]
    monkeypatch.setenv("GOMP_CPU_AFFINITY", "4 6")
    assert compute_cpus() == [4, 6]
    monkeypatch.setenv("OMP_PLACES", "{0,1}")
    assert compute_cpus() == [0, 1]
    assert cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
