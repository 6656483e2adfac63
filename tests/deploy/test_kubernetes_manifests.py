"""deploy/k8s: every manifest passes the Kubernetes schema (strict), and the pieces agree.

The schema check is kubernetes-validate with the OpenAPI schemas it ships (offline). The
cross-checks catch what a schema cannot: a connector config the connector would refuse, an env
variable the connector does not read, a ConfigMap key nobody defines, hugepages without limits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from mooncake_vllm.config import ENV_PREFIX, ConnectorConfig  # noqa: E402
from mooncake_vllm.metadata import ENV_VARS as METADATA_ENV_VARS  # noqa: E402

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))
K8S_VERSION = kubernetes_validate.utils.latest_version()
# Every MOONCAKE_VLLM_* variable a manifest sets must be one the connector or the metadata
# client reads: a typo would otherwise be silently ignored in production.
KNOWN_ENV = {ENV_PREFIX + f.upper() for f in ConnectorConfig.__dataclass_fields__}
KNOWN_ENV |= set(METADATA_ENV_VARS.values())


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _all_docs() -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in _docs(p)]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _all_docs() if d["kind"] == kind]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def _vllm_deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _by_kind("Deployment")
            if d["metadata"]["name"].startswith("vllm-")}


def test_manifests_exist() -> None:
    kinds = {d["kind"] for d in _all_docs()}
    assert {"Namespace", "StatefulSet", "Deployment", "Service", "ConfigMap", "Secret"} <= kinds
    assert set(_vllm_deployments()) == {"vllm-prefill", "vllm-decode"}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_passes_strict_schema(path: Path) -> None:
    for doc in _docs(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validator_rejects_a_broken_manifest() -> None:
    """The schema check is not vacuous: a misspelt field and a wrongly typed one both fail."""
    deployment = copy.deepcopy(_vllm_deployments()["vllm-prefill"])
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    deployment = copy.deepcopy(_vllm_deployments()["vllm-prefill"])
    _containers(deployment)[0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_role_configs_are_accepted_by_the_connector() -> None:
    (cm,) = [c for c in _by_kind("ConfigMap") if c["metadata"]["name"] == "mooncake-vllm-connector"]
    for role, kv_role in (("prefill", "kv_producer"), ("decode", "kv_consumer")):
        cfg = json.loads(cm["data"][f"{role}.json"])
        assert cfg["kv_connector"] == "MooncakeVllmConnector"
        assert cfg["kv_role"] == kv_role
        parsed = ConnectorConfig.from_sources(cfg["kv_connector_extra_config"], env={})
        assert parsed.metadata_server == "etcd://etcd:2379"
        assert parsed.uses_etcd


def test_references_resolve_and_env_is_read_by_the_connector() -> None:
    config_maps = {c["metadata"]["name"]: c["data"] for c in _by_kind("ConfigMap")}
    secrets = {s["metadata"]["name"]: s.get("stringData", s.get("data", {}))
               for s in _by_kind("Secret")}
    for deployment in _by_kind("Deployment") + _by_kind("StatefulSet"):
        for container in _containers(deployment):
            for env in container.get("env", []):
                name = env["name"]
                if name.startswith(ENV_PREFIX):
                    assert name in KNOWN_ENV, (
                        f"{deployment['metadata']['name']}: {name} is not a connector setting")
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in config_maps.get(ref["name"], {}), ref
                if "secretKeyRef" in source and not source["secretKeyRef"].get("optional"):
                    ref = source["secretKeyRef"]
                    assert ref["key"] in secrets.get(ref["name"], {}), ref


def test_vllm_pods_have_rdma_hugepages_and_health_probes() -> None:
    for name, deployment in _vllm_deployments().items():
        (container,) = _containers(deployment)
        assert container["command"] == ["vllm", "serve"], name
        assert "--kv-transfer-config=$(KV_TRANSFER_CONFIG)" in container["args"], name
        res = container["resources"]
        assert any(k.startswith("rdma/") for k in res["limits"]), name
        # Kubernetes requires hugepage requests to equal limits.
        assert res["requests"]["hugepages-2Mi"] == res["limits"]["hugepages-2Mi"], name
        assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"], name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["path"] == "/health", (name, probe)


def test_conductor_discovers_through_the_etcd_service() -> None:
    (conductor,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "conductor"]
    (container,) = _containers(conductor)
    assert container["command"] == ["mooncake-vllm", "proxy"]
    assert "--metadata-server=etcd://etcd:2379" in container["args"]
    # Its /health is 503 without healthy instances: ready-gating only, never a liveness check.
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] != "/health"
    services = {s["metadata"]["name"]: s for s in _by_kind("Service")}
    assert {p["port"] for p in services["etcd"]["spec"]["ports"]} >= {2379}
    assert services["conductor"]["spec"]["selector"] == conductor["spec"]["selector"]["matchLabels"]
