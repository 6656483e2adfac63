"""deploy/compose: the compose files are valid Compose, and their connector configs are valid.

Validation: `docker compose config` where a Docker client with the compose plugin exists (it
needs no engine), and always the Compose Specification JSON schema shipped beside this file
(see README.md here for where it comes from).
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft201909Validator

from mooncake_vllm.config import ConnectorConfig

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "compose"
MAIN = COMPOSE_DIR / "compose.yaml"
RDMA = COMPOSE_DIR / "compose.rdma.yaml"
SCHEMA = json.loads((Path(__file__).parent / "compose_spec.json").read_text())


def _load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def _schema_errors(doc: dict[str, Any]) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}"
            for e in Draft201909Validator(SCHEMA).iter_errors(doc)]


@pytest.mark.parametrize("path", [MAIN, RDMA], ids=lambda p: p.name)
def test_compose_file_matches_the_compose_spec_schema(path: Path) -> None:
    assert _schema_errors(_load(path)) == []


def test_schema_check_rejects_a_broken_file() -> None:
    doc = copy.deepcopy(_load(MAIN))
    doc["services"]["prefill"]["restart_policy"] = "always"  # not a service key
    doc["services"]["decode"]["ulimits"]["memlock"] = {"soft": "lots"}
    errors = _schema_errors(doc)
    assert any("restart_policy" in e for e in errors), errors
    assert any("memlock" in e for e in errors), errors


def _docker_compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    res = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return res.returncode == 0


@pytest.mark.skipif(not _docker_compose_works(), reason="no docker client with compose plugin")
def test_docker_compose_config_accepts_the_files() -> None:
    res = subprocess.run(
        ["docker", "compose", "-p", "mooncake-vllm", "-f", str(MAIN), "-f", str(RDMA),
         "config", "--quiet"],
        capture_output=True, text=True, timeout=60,
    )
    assert res.returncode == 0, res.stderr


def _kv_transfer_config(service: dict[str, Any]) -> dict[str, Any]:
    (arg,) = [a for a in service["command"] if a.startswith("--kv-transfer-config=")]
    return dict(json.loads(arg.removeprefix("--kv-transfer-config=")))


def test_vllm_services_carry_a_connector_config_the_connector_accepts() -> None:
    services = _load(MAIN)["services"]
    for name, role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        cfg = _kv_transfer_config(services[name])
        assert cfg["kv_connector"] == "MooncakeVllmConnector"
        assert cfg["kv_role"] == role
        env = {k: str(v) for k, v in services[name]["environment"].items() if "${" not in str(v)}
        parsed = ConnectorConfig.from_sources(cfg["kv_connector_extra_config"], env=env)
        port = next(a for a in services[name]["command"] if a.startswith("--port="))
        assert parsed.advertise_url.endswith(":" + port.removeprefix("--port="))
    rdma_env = _load(RDMA)["services"]["prefill"]["environment"]
    rdma_cfg = ConnectorConfig.from_sources(
        {}, env={"MOONCAKE_VLLM_PROTOCOL": rdma_env["MOONCAKE_VLLM_PROTOCOL"]})
    assert rdma_cfg.protocol == "rdma"
