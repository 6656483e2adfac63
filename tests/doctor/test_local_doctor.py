"""`mooncake-vllm doctor` reports the real build and the real (absent) RDMA devices."""

from __future__ import annotations

import json
import subprocess
import sys

from mooncake_vllm import doctor
from mooncake_vllm.engine import compiled_transports


def test_doctor_json_lists_transports_and_devices(capsys) -> None:
    assert doctor.main(["--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["engine"]["transports"] == compiled_transports()
    assert "tcp" in report["engine"]["transports"]
    devices = report["rdma_devices"]
    assert devices is None or isinstance(devices, list)


def test_doctor_cli_says_clearly_when_there_is_no_rdma_device() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mooncake_vllm.cli", "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "transports compiled in: " in out
    report = doctor.collect()
    if report["rdma_devices"] == []:
        assert "RDMA devices: none found" in out
    elif report["rdma_devices"] is None:
        assert "pyverbs unavailable" in out
