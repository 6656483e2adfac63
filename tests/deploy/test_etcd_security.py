"""deploy/ against a real etcd: the flags compose.yaml gives etcd, the certificates
deploy/etcd/make-certs.sh makes and the auth set-up deploy/etcd/enable-auth.sh does, together,
admit mooncake-vllm's metadata client exactly when it comes with the CA, its client
certificate and its password, as the compose services are configured, and refuse it otherwise.

Runs the etcd/etcdctl binaries of the test machine (Debian's 3.4; the images run 3.5, whose
flags and auth commands are the same), on free loopback ports instead of 2379/2380.
"""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_env import interpolate

from mooncake_vllm.testing.launcher import Launched
from mooncake_vllm.testing.ports import free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MAKE_CERTS = DEPLOY / "etcd" / "make-certs.sh"
ENABLE_AUTH = DEPLOY / "etcd" / "enable-auth.sh"
COMPOSE = DEPLOY / "compose" / "compose.yaml"

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(
        not all(shutil.which(b) for b in ("etcd", "etcdctl", "openssl", "bash")),
        reason="needs etcd, etcdctl, openssl and bash"),
]


class Deployment:
    """compose.yaml's etcd, with /run/secrets/* and its ports mapped onto this machine."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.certs = tmp / "certs"
        subprocess.run(["bash", str(MAKE_CERTS), str(self.certs)], check=True,
                       capture_output=True, text=True)
        self.cport, self.pport = free_port(), free_port()
        self.env = {"MOONCAKE_VLLM_CLUSTER_TOKEN": "t" * 64,
                    "MOONCAKE_VLLM_ADMIN_TOKEN": "a" * 64,
                    "MOONCAKE_VLLM_ETCD_PASSWORD": "service-pw-" + "x" * 20,
                    "ETCD_ROOT_PASSWORD": "root-pw-" + "y" * 20,
                    "ETCD_TLS_DIR": str(self.certs)}
        doc = interpolate(yaml.safe_load(COMPOSE.read_text()), self.env)
        self.secrets = {f"/run/secrets/{name}": spec["file"]
                        for name, spec in doc["secrets"].items()}
        self.services: dict[str, Any] = doc["services"]

    def map(self, value: str) -> str:
        for inside, outside in self.secrets.items():
            value = value.replace(inside, outside)
        return (value.replace("127.0.0.1:2379", f"127.0.0.1:{self.cport}")
                .replace("127.0.0.1:2380", f"127.0.0.1:{self.pport}"))

    def service_env(self, name: str) -> dict[str, str]:
        return {k: self.map(str(v)) for k, v in self.services[name]["environment"].items()}

    def etcd_command(self) -> list[str]:
        command = [self.map(a) for a in self.services["etcd"]["command"]]
        return [a for a in command if not a.startswith("--data-dir=")] + [
            f"--data-dir={self.tmp / 'data'}"]

    def enable_auth(self) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ["PATH"], **self.service_env("etcd-auth")}
        return subprocess.run(["bash", str(ENABLE_AUTH)], env=env, capture_output=True,
                              text=True, timeout=120)


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    d = Deployment(tmp_path)
    etcd = Launched(d.etcd_command(), name="compose etcd", log_path=tmp_path / "etcd.log")
    # etcd demands a client certificate: /health is asked with one.
    tls = ssl.create_default_context(cafile=str(d.certs / "ca.crt"))
    tls.load_cert_chain(str(d.certs / "client.crt"), str(d.certs / "client.key"))
    try:
        etcd.start().wait_http(f"https://127.0.0.1:{d.cport}/health", 20, ssl_context=tls)
        yield d
    finally:
        etcd.stop(10)


def _open(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], url: str) -> Any:
    from mooncake_vllm.metadata import ENV_VARS, open_metadata

    for var in ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        if var.startswith("MOONCAKE_VLLM_ETCD_"):
            monkeypatch.setenv(var, value)
    return open_metadata(url, namespace="deploy-test", timeout_s=3)


def test_compose_etcd_admits_only_clients_with_certificate_and_password(
        deployment: Deployment, monkeypatch: pytest.MonkeyPatch) -> None:
    from mooncake_vllm.metadata import MetadataUnavailableError

    first = deployment.enable_auth()
    assert first.returncode == 0, first.stdout + first.stderr
    again = deployment.enable_auth()  # a restart of the compose project runs it again
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already enabled" in again.stdout

    (arg,) = [a for a in deployment.services["conductor"]["command"]
              if a.startswith("--metadata-server=")]
    url = deployment.map(arg.removeprefix("--metadata-server="))
    assert url.startswith("etcds://")
    env = deployment.service_env("conductor")

    md = _open(monkeypatch, env, url)  # exactly as the conductor is configured
    try:
        md.publish_segment("deploy-test-segment", {"ok": True})
    finally:
        md.close()

    no_cert = {k: v for k, v in env.items()
               if k not in ("MOONCAKE_VLLM_ETCD_CERT", "MOONCAKE_VLLM_ETCD_KEY")}
    no_password = {k: v for k, v in env.items()
                   if k not in ("MOONCAKE_VLLM_ETCD_USER", "MOONCAKE_VLLM_ETCD_PASSWORD")}
    wrong_password = {**env, "MOONCAKE_VLLM_ETCD_PASSWORD": "not-the-password"}
    for name, bad in (("no client certificate", no_cert), ("no password", no_password),
                      ("wrong password", wrong_password)):
        with pytest.raises(MetadataUnavailableError):
            _open(monkeypatch, bad, url).close()
            pytest.fail(f"etcd admitted a client with {name}")
    plain = url.replace("etcds://", "etcd://")
    no_tls = {k: v for k, v in env.items() if not k.endswith(("_CA_CERT", "_CERT", "_KEY"))}
    with pytest.raises(MetadataUnavailableError):
        _open(monkeypatch, no_tls, plain).close()
