"""deploy/compose: the compose files are valid Compose, their connector configs are valid, and
they are secure by construction (issue 11): no secret has a default (every one is required with
`${VAR:?message}`), etcd serves TLS only and demands client certificates, and every process
that talks to etcd does so over etcds:// with a certificate and a password.

Validation: `docker compose config` where a Compose v2 binary exists (the docker plugin, or a
standalone `docker-compose` v2; it needs no engine), and always the Compose Specification JSON
schema shipped beside this file (see README.md here for where it comes from) and compose_env.py
(Compose's interpolation rules), so the checks run without Docker.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_env import MissingVariable, interpolate, interpolate_str, references
from etcd_flags import etcd_tls_problems, file_flags
from jsonschema import Draft201909Validator

from mooncake_vllm.config import ConnectorConfig

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "deploy" / "compose"
MAIN = COMPOSE_DIR / "compose.yaml"
RDMA = COMPOSE_DIR / "compose.rdma.yaml"
SCHEMA = json.loads((Path(__file__).parent / "compose_spec.json").read_text())
TOKEN_ENV = "MOONCAKE_VLLM_CLUSTER_TOKEN"
# The secrets compose.yaml must refuse to start without (no default can be right for them).
REQUIRED = (TOKEN_ENV, "MOONCAKE_VLLM_ADMIN_TOKEN", "MOONCAKE_VLLM_ETCD_PASSWORD",
            "ETCD_ROOT_PASSWORD", "ETCD_TLS_DIR")
SERVING = ("prefill", "decode", "store", "conductor")
# Values for every required variable, as deploy/compose/init-secrets.sh would write them.
FULL_ENV = {TOKEN_ENV: "a" * 64, "MOONCAKE_VLLM_ADMIN_TOKEN": "b" * 64,
            "MOONCAKE_VLLM_ETCD_PASSWORD": "c" * 48, "ETCD_ROOT_PASSWORD": "d" * 48,
            "ETCD_TLS_DIR": "/srv/mooncake-vllm/etcd-tls"}


def _load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text()))


def _services(path: Path = MAIN, env: dict[str, str] | None = None) -> dict[str, Any]:
    doc = _load(path)
    return dict(interpolate(doc, FULL_ENV if env is None else env)["services"])


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


# ------------------------------------------------------------------------------ secrets
@pytest.mark.parametrize("path", [MAIN, RDMA], ids=lambda p: p.name)
def test_no_secret_has_a_default(path: Path) -> None:
    """No token or password variable falls back to a value written in the file."""
    for name, op, arg in references(path.read_text()):
        if re.search(r"TOKEN|PASSWORD", name) and op in (":-", "-", ":+", "+"):
            assert arg == "", f"{path.name}: ${{{name}{op}{arg}}} gives a secret a default"


def test_serving_services_require_the_cluster_token() -> None:
    """prefill, decode and conductor take the token from the environment, required: `:?`
    refuses unset and empty alike, so compose stops before anything starts."""
    raw = _load(MAIN)["services"]
    for name in SERVING:
        value = str(raw[name].get("environment", {}).get(TOKEN_ENV, ""))
        assert re.fullmatch(rf"\$\{{{TOKEN_ENV}:\?[^}}]+\}}", value), (name, value)
    raw_rdma = _load(RDMA)["services"]
    assert set(raw_rdma) >= {"prefill", "decode"}
    for name, service in raw_rdma.items():
        value = str(service.get("environment", {}).get(TOKEN_ENV, ""))
        assert re.fullmatch(rf"\$\{{{TOKEN_ENV}:\?[^}}]+\}}", value), (name, value)
    conductor = str(raw["conductor"]["environment"].get("MOONCAKE_VLLM_ADMIN_TOKEN", ""))
    assert conductor.startswith("${MOONCAKE_VLLM_ADMIN_TOKEN:?"), conductor


@pytest.mark.parametrize("missing", REQUIRED)
def test_compose_refuses_to_start_without_each_secret(missing: str) -> None:
    for env in ({k: v for k, v in FULL_ENV.items() if k != missing}, {**FULL_ENV, missing: ""}):
        with pytest.raises(MissingVariable) as info:
            interpolate(_load(MAIN), env)
        assert info.value.name == missing
    if missing == TOKEN_ENV:
        with pytest.raises(MissingVariable):
            interpolate(_load(RDMA), {k: v for k, v in FULL_ENV.items() if k != missing})


def test_interpolation_rules() -> None:
    """compose_env follows Compose: the check above is not vacuous."""
    assert interpolate_str("${A:-x}", {}) == "x"
    assert interpolate_str("${A:-x}", {"A": ""}) == "x"
    assert interpolate_str("${A-x}", {"A": ""}) == ""
    assert interpolate_str("$${A}", {}) == "${A}"
    with pytest.raises(MissingVariable):
        interpolate_str("${A:?say}", {"A": ""})
    assert interpolate_str("${A?say}", {"A": ""}) == ""
    with pytest.raises(ValueError):
        interpolate_str("$(openssl rand -hex 32)", {})
    # The old default is exactly what the test above rejects.
    assert references("${MOONCAKE_VLLM_CLUSTER_TOKEN:-change-me}") == [
        (TOKEN_ENV, ":-", "change-me")]


# --------------------------------------------------------------------------------- etcd
def _secret_files(service: dict[str, Any]) -> set[str]:
    names = [s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])]
    return {f"/run/secrets/{n}" for n in names}


def test_etcd_serves_tls_only_and_demands_client_certificates() -> None:
    services = _services()
    etcd = services["etcd"]
    command = list(etcd["command"])
    assert etcd_tls_problems(command) == []
    top = _load(MAIN)["secrets"]
    for flag, path in file_flags(command).items():
        assert path in _secret_files(etcd), f"--{flag}={path}: not a secret etcd mounts"
        assert path.removeprefix("/run/secrets/") in top
    # Its own health check has to speak TLS with a certificate too.
    health = " ".join(etcd["healthcheck"]["test"])
    assert "https://" in health and "--cert=" in health and "--cacert=" in health


def test_clients_reach_etcd_over_tls_with_a_certificate_and_a_password() -> None:
    services = _services()
    for name in ("prefill", "decode"):
        cfg = _kv_transfer_config(services[name])
        assert cfg["kv_connector_extra_config"]["metadata_server"].startswith("etcds://"), name
    assert any(a.startswith("--metadata-server=etcds://") for a in services["conductor"]["command"])
    for name in (*SERVING, "etcd-auth"):
        service = services[name]
        env = service["environment"]
        for var in ("MOONCAKE_VLLM_ETCD_CA_CERT", "MOONCAKE_VLLM_ETCD_CERT",
                    "MOONCAKE_VLLM_ETCD_KEY"):
            assert env.get(var) in _secret_files(service), (name, var, env.get(var))
        assert env.get("MOONCAKE_VLLM_ETCD_USER"), name
        assert env.get("MOONCAKE_VLLM_ETCD_PASSWORD") == FULL_ENV["MOONCAKE_VLLM_ETCD_PASSWORD"]
    # They start only once etcd's auth is on (with a user set they could not log in before).
    for name in SERVING:
        assert services[name]["depends_on"]["etcd-auth"]["condition"] == (
            "service_completed_successfully"), name
    # The auth set-up script it mounts is the one in deploy/etcd/.
    (mount,) = services["etcd-auth"]["volumes"]
    assert (COMPOSE_DIR / mount.split(":")[0]).resolve() == (
        COMPOSE_DIR.parent / "etcd" / "enable-auth.sh")


# ----------------------------------------------------------------------- docker compose
def _compose_command() -> list[str] | None:
    candidates = []
    docker, standalone = shutil.which("docker"), shutil.which("docker-compose")
    if docker:
        candidates.append([docker, "compose"])
    if standalone:
        candidates.append([standalone])  # Compose v2 only: v1 is another implementation
    for cmd in candidates:
        res = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=30)
        if res.returncode == 0 and re.search(r"v?2\.\d+", res.stdout):
            return cmd
    return None


COMPOSE = _compose_command()


def _compose_config(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # --env-file replaces deploy/compose/.env (which init-secrets.sh may have written here).
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    assert COMPOSE is not None
    return subprocess.run(
        [*COMPOSE, "-p", "mooncake-vllm", "--env-file", str(env_file), "-f", str(MAIN),
         "-f", str(RDMA), "config", "--quiet"],
        capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "HOME": str(tmp_path)},
    )


@pytest.mark.skipif(COMPOSE is None, reason="no Compose v2 (docker compose / docker-compose)")
def test_docker_compose_config_accepts_the_files(tmp_path: Path) -> None:
    res = _compose_config(tmp_path, FULL_ENV)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(COMPOSE is None, reason="no Compose v2 (docker compose / docker-compose)")
def test_docker_compose_refuses_the_files_without_the_token(tmp_path: Path) -> None:
    res = _compose_config(tmp_path, {k: v for k, v in FULL_ENV.items() if k != TOKEN_ENV})
    assert res.returncode != 0
    assert TOKEN_ENV in res.stderr, res.stderr


# ---------------------------------------------------------------------- connector config
def _kv_transfer_config(service: dict[str, Any]) -> dict[str, Any]:
    (arg,) = [a for a in service["command"] if a.startswith("--kv-transfer-config=")]
    return dict(json.loads(arg.removeprefix("--kv-transfer-config=")))


def test_vllm_services_carry_a_connector_config_the_connector_accepts() -> None:
    services = _services()
    for name, role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        cfg = _kv_transfer_config(services[name])
        assert cfg["kv_connector"] == "MooncakeVllmConnector"
        assert cfg["kv_role"] == role
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        # The connector reads MOONCAKE_VLLM_*; the etcd client (not ConnectorConfig) reads
        # MOONCAKE_VLLM_ETCD_*.
        env = {k: v for k, v in env.items() if not k.startswith("MOONCAKE_VLLM_ETCD_")}
        parsed = ConnectorConfig.from_sources(cfg["kv_connector_extra_config"], env=env)
        assert parsed.cluster_token == FULL_ENV[TOKEN_ENV]
        assert parsed.metadata_server.startswith("etcds://")
        port = next(a for a in services[name]["command"] if a.startswith("--port="))
        assert parsed.advertise_url.endswith(":" + port.removeprefix("--port="))
    rdma_env = _services(RDMA)["prefill"]["environment"]
    rdma_cfg = ConnectorConfig.from_sources(
        {}, env={"MOONCAKE_VLLM_PROTOCOL": rdma_env["MOONCAKE_VLLM_PROTOCOL"]})
    assert rdma_cfg.protocol == "rdma"


def test_the_store_service_runs_a_command_the_store_accepts() -> None:
    from mooncake_vllm.store.__main__ import _parser

    command = _load(MAIN)["services"]["store"]["command"]
    assert command[:2] == ["mooncake-vllm", "store"]
    args = [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", a) for a in command[2:]]
    parsed = _parser().parse_args(args)
    assert parsed.metadata_server.startswith("etcds://") and not parsed.insecure
    for name in ("prefill", "decode"):
        extra = _kv_transfer_config(_services()[name])["kv_connector_extra_config"]
        assert extra.get("pool") is True, name
