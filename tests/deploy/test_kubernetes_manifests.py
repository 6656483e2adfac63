"""deploy/k8s: every manifest passes the Kubernetes schema (strict), and the pieces agree.

The schema check is kubernetes-validate with the OpenAPI schemas it ships (offline). The
cross-checks catch what a schema cannot: a connector config the connector would refuse, an env
variable the connector does not read, a ConfigMap key nobody defines, hugepages without limits,
and the security posture (issue 11): secrets only from Secrets and never with a usable default,
etcd over TLS with client certificates and a password, and NetworkPolicies that admit only the
serving pods to the engine, control and etcd ports.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from etcd_flags import etcd_tls_problems, file_flags

kubernetes_validate = pytest.importorskip("kubernetes_validate")

from mooncake_vllm.config import ENV_PREFIX, ConnectorConfig  # noqa: E402
from mooncake_vllm.metadata import ENV_VARS as METADATA_ENV_VARS  # noqa: E402
from mooncake_vllm.proxy import __main__ as proxy_main  # noqa: E402

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# What `kubectl apply -f deploy/k8s/` applies (not recursive) ...
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))
# ... and the Secret templates beside it, which it must never apply.
TEMPLATES = sorted((K8S_DIR / "secrets").glob("*.yaml"))
K8S_VERSION = kubernetes_validate.utils.latest_version()
# Every MOONCAKE_VLLM_* variable a manifest sets must be one the connector, the metadata client
# or the conductor reads: a typo would otherwise be silently ignored in production.
KNOWN_ENV = {ENV_PREFIX + f.upper() for f in ConnectorConfig.__dataclass_fields__}
KNOWN_ENV |= set(METADATA_ENV_VARS.values())
# The conductor's secrets: flags, or the ENV_* variables its command line module names.
CONDUCTOR_ENV = {v for k, v in vars(proxy_main).items() if k.startswith("ENV_")}
KNOWN_ENV |= CONDUCTOR_ENV

SERVING = ("vllm-prefill", "vllm-decode", "mooncake-store", "conductor")
INSTANCES = ("vllm-prefill", "vllm-decode")
TOKEN_ENV = "MOONCAKE_VLLM_CLUSTER_TOKEN"
ETCD_CLIENT_PORT = 2379


@functools.cache
def _docs(path: Path) -> list[dict[str, Any]]:
    """Parsed once per run (the checks below read the same files many times): do not mutate,
    deep-copy first."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [d for d in yaml.load_all(path.read_text(), Loader=loader) if d]


def _all_docs() -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in _docs(p)]


def _template_docs() -> list[dict[str, Any]]:
    return [d for p in TEMPLATES for d in _docs(p)]


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _all_docs() if d["kind"] == kind]


def _workloads() -> list[dict[str, Any]]:
    return _by_kind("Deployment") + _by_kind("StatefulSet") + _by_kind("DaemonSet")


def _workload(name: str) -> dict[str, Any]:
    (doc,) = [d for d in _workloads() if d["metadata"]["name"] == name]
    return doc


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _vllm_deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in _by_kind("Deployment")
            if d["metadata"]["name"].startswith("vllm-")}


def _role_configs() -> dict[str, dict[str, Any]]:
    (cm,) = [c for c in _by_kind("ConfigMap") if c["metadata"]["name"] == "mooncake-vllm-connector"]
    return {role: json.loads(cm["data"][f"{role}.json"]) for role in ("prefill", "decode")}


def _secret_keys() -> dict[str, set[str]]:
    """Secret name -> its keys, from the templates (the real Secrets are made with kubectl)."""
    return {s["metadata"]["name"]: set(s.get("data", {})) | set(s.get("stringData", {}))
            for s in _template_docs() if s["kind"] == "Secret"}


def test_manifests_exist() -> None:
    kinds = {d["kind"] for d in _all_docs()}
    assert {"Namespace", "StatefulSet", "Deployment", "Service", "ConfigMap",
            "NetworkPolicy"} <= kinds
    assert set(_vllm_deployments()) == {"vllm-prefill", "vllm-decode"}
    assert TEMPLATES, "deploy/k8s/secrets/*.yaml: the Secret templates"


@pytest.mark.parametrize("path", MANIFESTS + TEMPLATES, ids=lambda p: p.name)
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
    for role, cfg in _role_configs().items():
        kv_role = {"prefill": "kv_producer", "decode": "kv_consumer"}[role]
        assert cfg["kv_connector"] == "MooncakeVllmConnector"
        assert cfg["kv_role"] == kv_role
        extra = cfg["kv_connector_extra_config"]
        assert extra["metadata_server"] == "etcds://etcd:2379", "etcd is reached over TLS"
        # The connector must accept exactly this (mooncake_vllm/config.py: metadata_server
        # "etcds://..." is etcd over TLS, as mooncake_vllm.metadata.parse_metadata_url reads it),
        # with the literal MOONCAKE_VLLM_* values the pod sets (its own addresses from its IP).
        (container,) = _containers(_vllm_deployments()[f"vllm-{role}"])
        pod_env = {k: e["value"].replace("$(POD_IP)", "10.1.2.3")
                   for k, e in _env(container).items()
                   if k.startswith(ENV_PREFIX) and "value" in e}
        assert "MOONCAKE_VLLM_ADVERTISE_URL" in pod_env and "MOONCAKE_VLLM_HOSTNAME" in pod_env
        pod_env["MOONCAKE_VLLM_CLUSTER_TOKEN"] = "a-token-from-the-secret-0123456789"
        parsed = ConnectorConfig.from_sources(extra, env=pod_env)
        assert parsed.metadata_server == "etcds://etcd:2379"
        assert parsed.uses_etcd


def test_references_resolve_and_env_is_read_by_the_connector() -> None:
    config_maps = {c["metadata"]["name"]: c["data"] for c in _by_kind("ConfigMap")}
    secrets = _secret_keys()
    for workload in _workloads():
        name = workload["metadata"]["name"]
        for container in _containers(workload):
            for env in container.get("env", []):
                if env["name"].startswith(ENV_PREFIX):
                    assert env["name"] in KNOWN_ENV, f"{name}: {env['name']} is read by nobody"
                source = env.get("valueFrom", {})
                if "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    assert ref["key"] in config_maps.get(ref["name"], {}), ref
                if "secretKeyRef" in source and not source["secretKeyRef"].get("optional"):
                    ref = source["secretKeyRef"]
                    assert ref["key"] in secrets.get(ref["name"], set()), (
                        f"{name}: {ref} is in no template of deploy/k8s/secrets/")
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] in secrets, (name, volume)


def test_no_secret_is_shipped_with_a_value() -> None:
    """deploy/k8s/*.yaml holds no Secret at all (`kubectl apply -f deploy/k8s/` would otherwise
    create it, or overwrite the real one); the templates hold placeholders that the API server
    refuses (not base64), never a value a cluster could run with."""
    shipped = [d["metadata"]["name"] for d in _all_docs() if d["kind"] == "Secret"]
    assert shipped == [], f"Secrets with values in deploy/k8s/*.yaml: {shipped}"
    templates = [d for d in _template_docs() if d["kind"] == "Secret"]
    assert {"mooncake-vllm-cluster-token", "mooncake-vllm-admin-token"} <= {
        t["metadata"]["name"] for t in templates}
    for secret in templates:
        name = secret["metadata"]["name"]
        assert "stringData" not in secret, f"{name}: stringData would be taken as the value"
        assert secret.get("data"), name
        for key, value in secret["data"].items():
            assert "REPLACE" in value, f"{name}.{key}: not an explicit placeholder"
            with pytest.raises(binascii.Error):
                base64.b64decode(value, validate=True)


def test_serving_containers_take_secrets_from_secret_refs_only() -> None:
    """Prefill, decode and conductor get the cluster token from a Secret (the instances listen
    on their pod IP, where the connector refuses to run without one); the conductor also gets
    its admin token that way. No token or password anywhere is a literal, and nothing turns
    the connector's refusal off."""
    for name in SERVING:
        (container,) = _containers(_workload(name))
        env = _env(container)
        wanted = [TOKEN_ENV] + (["MOONCAKE_VLLM_ADMIN_TOKEN"] if name == "conductor" else [])
        if name == "conductor":
            assert set(wanted) <= CONDUCTOR_ENV, "the conductor reads these (proxy/__main__.py)"
        for var in wanted:
            assert var in env, f"{name}: {var} is not set"
            assert "value" not in env[var], f"{name}: {var} is a literal"
            ref = env[var].get("valueFrom", {}).get("secretKeyRef")
            assert ref, f"{name}: {var} is not from a secretKeyRef"
            assert not ref.get("optional"), f"{name}: {var} must not be optional"
    for workload in _workloads():
        for container in _containers(workload):
            for env in container.get("env", []):
                if any(w in env["name"] for w in ("TOKEN", "PASSWORD")):
                    assert "value" not in env, (workload["metadata"]["name"], env["name"])
            assert "MOONCAKE_VLLM_INSECURE" not in _env(container)
    for role, cfg in _role_configs().items():
        assert "insecure" not in cfg["kv_connector_extra_config"], role


def test_instances_listen_on_the_pod_ip() -> None:
    """Why the token is mandatory: the connector's hostname is the pod IP (not loopback)."""
    for name in INSTANCES:
        (container,) = _containers(_workload(name))
        env = _env(container)
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env["MOONCAKE_VLLM_HOSTNAME"]["value"] == "$(POD_IP)"
        assert env["VLLM_HOST_IP"]["value"] == "$(POD_IP)"


def _mounted_secret_files(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """Path of each file a Secret volume puts in this container -> "secret/key"."""
    keys = _secret_keys()
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}
    files: dict[str, str] = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes.get(mount["name"], {}).get("secret")  # else a PVC template, ...
        if not secret:
            continue
        assert mount.get("readOnly"), (workload["metadata"]["name"], mount)
        items = secret.get("items") or [{"key": k, "path": k}
                                         for k in keys.get(secret["secretName"], ())]
        for item in items:
            files[f"{mount['mountPath'].rstrip('/')}/{item['path']}"] = (
                f"{secret['secretName']}/{item['key']}")
    return files


def test_serving_pods_reach_etcd_over_tls_with_a_certificate_and_a_password() -> None:
    conductor_args = _containers(_workload("conductor"))[0]["args"]
    assert "--metadata-server=etcds://etcd:2379" in conductor_args
    for name in SERVING:
        workload = _workload(name)
        (container,) = _containers(workload)
        env = _env(container)
        for var in ("MOONCAKE_VLLM_ETCD_USER", "MOONCAKE_VLLM_ETCD_PASSWORD"):
            assert env.get(var, {}).get("valueFrom", {}).get("secretKeyRef"), (name, var)
        files = _mounted_secret_files(workload, container)
        for var in ("MOONCAKE_VLLM_ETCD_CA_CERT", "MOONCAKE_VLLM_ETCD_CERT",
                    "MOONCAKE_VLLM_ETCD_KEY"):
            path = env.get(var, {}).get("value")
            assert path in files, f"{name}: {var}={path!r} is no file of a mounted Secret"


def test_etcd_serves_tls_only_and_demands_client_certificates() -> None:
    etcd = _workload("etcd")
    (container,) = _containers(etcd)
    command = container["command"] + container.get("args", [])
    assert etcd_tls_problems(command) == []
    files = _mounted_secret_files(etcd, container)
    for flag, path in file_flags(command).items():
        assert path in files, f"--{flag}={path} is no file of a mounted Secret"
    # The kubelet cannot present a client certificate: probes go to the plain metrics listener
    # (/health only, no keys), never to the client port.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    metrics = [a for a in command if a.startswith("--listen-metrics-urls=")]
    for probe in ("readinessProbe", "livenessProbe"):
        port = container[probe]["httpGet"]["port"]
        number = ports.get(port, port)
        assert number != ETCD_CLIENT_PORT, probe
        assert metrics and f":{number}" in metrics[0], (probe, metrics)


def test_tls_check_is_not_vacuous() -> None:
    plain = ["etcd", "--listen-client-urls=http://0.0.0.0:2379",
             "--advertise-client-urls=http://etcd:2379", "--listen-peer-urls=http://0.0.0.0:2380"]
    problems = etcd_tls_problems(plain)
    for expected in ("listen-client-urls", "client-cert-auth", "trusted-ca-file",
                     "listen-peer-urls", "peer-client-cert-auth"):
        assert any(expected in p for p in problems), (expected, problems)
    (container,) = _containers(_workload("etcd"))
    good = list(container["command"])
    assert etcd_tls_problems([a for a in good if a != "--client-cert-auth"]) != []
    assert etcd_tls_problems(good + ["--client-cert-auth=false"]) != []


# ------------------------------------------------------------------------- NetworkPolicy
def _pod_labels() -> dict[str, dict[str, str]]:
    """Workload name -> its pods' labels."""
    return {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
            for w in _workloads()}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _selected(selector: dict[str, Any]) -> set[str]:
    return {name for name, labels in _pod_labels().items() if _selects(selector, labels)}


def _container_ports(workload: str) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in _containers(_workload(workload))
            for p in c.get("ports", []) if "name" in p}


def _rule_admits_port(rule: dict[str, Any], port: int, workload: str) -> bool:
    if not rule.get("ports"):
        return True  # no ports: every port
    named = _container_ports(workload)
    for p in rule["ports"]:
        if p.get("protocol", "TCP") != "TCP":
            continue
        if "port" not in p:
            return True
        first = named.get(p["port"], p["port"]) if isinstance(p["port"], str) else p["port"]
        if first <= port <= p.get("endPort", first):
            return True
    return False


def _admitted_sources(workload: str, port: int) -> set[str] | None:
    """Which pods of the namespace may open `port` on `workload`'s pods under the policies;
    None: any source (a rule with no `from`, or one with a namespace or IP block)."""
    policies = _by_kind("NetworkPolicy")
    isolating = [p for p in policies
                 if workload in _selected(p["spec"]["podSelector"])
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not isolating:
        return None  # not isolated: Kubernetes admits everything
    sources: set[str] = set()
    for policy in isolating:
        for rule in policy["spec"].get("ingress", []):
            if not _rule_admits_port(rule, port, workload):
                continue
            if not rule.get("from"):
                return None
            for peer in rule["from"]:
                if set(peer) != {"podSelector"}:
                    return None  # namespaceSelector / ipBlock: beyond this namespace's pods
                sources |= _selected(peer["podSelector"])
    return sources


def test_namespace_denies_ingress_by_default() -> None:
    deny = [p for p in _by_kind("NetworkPolicy")
            if p["spec"]["podSelector"] == {} and "Ingress" in p["spec"].get("policyTypes", [])
            and not p["spec"].get("ingress")]
    assert deny, "no default-deny ingress NetworkPolicy (podSelector: {}, no ingress rules)"
    assert all(p["metadata"]["namespace"] == "mooncake-vllm" for p in _by_kind("NetworkPolicy"))


def test_network_policies_admit_only_serving_pods_to_engine_control_and_etcd() -> None:
    prefill_ports = _container_ports("vllm-prefill")
    for name in INSTANCES:
        ports = _container_ports(name)
        assert ports == prefill_ports, "prefill and decode expose the same ports"
        for port_name in ("engine", "control"):
            port = ports[port_name]
            sources = _admitted_sources(name, port)
            assert sources is not None, f"{name}:{port} ({port_name}) is open to any source"
            assert sources <= set(SERVING), (name, port_name, sources)
            # ...and the deployment still works: the instances reach each other.
            assert set(INSTANCES) <= sources, (name, port_name, sources)
        # TP rank r's control channel listens on control + r: the whole range is admitted.
        assert _admitted_sources(name, ports["control"] + 7) == _admitted_sources(
            name, ports["control"])
        http = _admitted_sources(name, ports["http"])
        assert http is not None and http <= set(SERVING) and "conductor" in http, (name, http)
        # Any other port: nobody.
        assert _admitted_sources(name, 12345) == set(), name
    etcd_ports = _container_ports("etcd")
    assert etcd_ports["client"] == ETCD_CLIENT_PORT
    sources = _admitted_sources("etcd", ETCD_CLIENT_PORT)
    assert sources == set(SERVING), f"etcd:{ETCD_CLIENT_PORT} admits {sources}"
    assert _admitted_sources("etcd", etcd_ports["peer"]) == {"etcd"}
    assert _admitted_sources("etcd", etcd_ports["metrics"]) == set()


def test_store_nodes_admit_the_instances_and_listen_with_the_token() -> None:
    """The pool's nodes: the channel from the instances and the conductor, the engine from
    the instances only (their one-sided reads and writes), nothing else; they listen on the
    pod IP with the cluster token and reach etcd like the instances."""
    ports = _container_ports("mooncake-store")
    assert _admitted_sources("mooncake-store", ports["control"]) == {*INSTANCES, "conductor"}
    assert _admitted_sources("mooncake-store", ports["engine"]) == set(INSTANCES)
    assert _admitted_sources("mooncake-store", ports["status"]) == set()
    (container,) = _containers(_workload("mooncake-store"))
    assert container["command"] == ["mooncake-vllm", "store"]
    args = container["args"]
    assert "--metadata-server=etcds://etcd:2379" in args and "--hostname=$(POD_IP)" in args
    assert f"--control-port={ports['control']}" in args
    assert f"--engine-port={ports['engine']}" in args
    assert f"--status-port={ports['status']}" in args
    assert "--insecure" not in args
    for role, cfg in _role_configs().items():
        assert cfg["kv_connector_extra_config"].get("pool") is True, role
    # The store's command line refuses what it does not know: these flags all exist.
    from mooncake_vllm.store.__main__ import _parser

    parsed = _parser().parse_args([a.replace("$(POD_IP)", "10.1.2.3").replace(
        "$(NODE_NAME)", "node-1") for a in args])
    assert parsed.hostname == "10.1.2.3" and parsed.slot_bytes >= 1 << 20


def test_conductor_port_is_open_to_clients() -> None:
    port = _container_ports("conductor")["http"]
    assert _admitted_sources("conductor", port) is None, "clients must reach the conductor"
    assert _admitted_sources("conductor", port + 1) == set()


def test_policy_check_is_not_vacuous() -> None:
    assert _selected({"matchLabels": {"app.kubernetes.io/name": "etcd"}}) == {"etcd"}
    assert _selected({"matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In",
                                            "values": list(INSTANCES)}]}) == set(INSTANCES)
    assert _selected({}) == set(_pod_labels())
    rule: dict[str, Any] = {"ports": [{"protocol": "TCP", "port": 17200, "endPort": 17207}]}
    assert _rule_admits_port(rule, 17203, "vllm-prefill")
    assert not _rule_admits_port(rule, 17208, "vllm-prefill")
    assert _rule_admits_port({"ports": [{"port": "engine"}]}, 17100, "vllm-prefill")


def _env_names(containers: Iterable[dict[str, Any]]) -> set[str]:
    return {e["name"] for c in containers for e in c.get("env", [])}


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
        assert {"MODEL", "KV_TRANSFER_CONFIG"} <= _env_names([container]), name


def test_conductor_discovers_through_the_etcd_service() -> None:
    conductor = _workload("conductor")
    (container,) = _containers(conductor)
    assert container["command"] == ["mooncake-vllm", "proxy"]
    assert "--metadata-server=etcds://etcd:2379" in container["args"]
    # Its /health is 503 without healthy instances: ready-gating only, never a liveness check.
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] != "/health"
    services = {s["metadata"]["name"]: s for s in _by_kind("Service")}
    assert {p["port"] for p in services["etcd"]["spec"]["ports"]} >= {ETCD_CLIENT_PORT}
    assert services["conductor"]["spec"]["selector"] == conductor["spec"]["selector"]["matchLabels"]
    # The StatefulSet's governing Service is headless (per-member DNS names for peer URLs).
    etcd = _workload("etcd")
    governing = services[etcd["spec"]["serviceName"]]
    assert governing["spec"].get("clusterIP") == "None"
