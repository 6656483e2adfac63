"""etcd with user/password authentication, TLS, and mutual TLS."""

from __future__ import annotations

from pathlib import Path

import pytest

from mooncake_vllm.metadata import (
    MetadataConfigError,
    MetadataError,
    MetadataUnavailableError,
    open_metadata,
)
from mooncake_vllm.testing.etcd_server import EtcdServer

from .helpers import make_info, wait_until

pytestmark = pytest.mark.etcd


def test_auth_with_user_and_password_and_a_restart(tmp_path: Path) -> None:
    with EtcdServer(tmp_path / "etcd", auth=True) as etcd:
        assert etcd.user and etcd.password
        with open_metadata(etcd.url, ttl_s=3, user=etcd.user, password=etcd.password) as a, \
                open_metadata(etcd.url, ttl_s=3, **etcd.client_options()) as b:
            a.register_instance(make_info("p0"))
            wait_until(lambda: b.get_instance("p0") is not None, 5, "discovery with auth")
            # etcd forgets auth tokens when it restarts: the store must log in again.
            etcd.restart()
            wait_until(lambda: a.online and b.online, 10, "re-login")  # type: ignore[attr-defined]
            a.register_instance(make_info("p1"))
            wait_until(lambda: b.get_instance("p1") is not None, 5, "discovery after restart")


def test_auth_failures_are_clear_errors(tmp_path: Path) -> None:
    with EtcdServer(tmp_path / "etcd", auth=True) as etcd:
        with pytest.raises(MetadataUnavailableError, match="authentication failed") as err:
            open_metadata(etcd.url, user="root", password="wrong")
        assert etcd.endpoint in str(err.value) and "user/password" in str(err.value)
        with pytest.raises(MetadataUnavailableError, match="user name is empty"):
            open_metadata(etcd.url)  # auth is on, no credentials given
        with pytest.raises(MetadataConfigError, match="both user and password"):
            open_metadata(etcd.url, user="root")


def test_a_refused_write_raises_instead_of_retrying(tmp_path: Path) -> None:
    with EtcdServer(tmp_path / "etcd", auth=True) as etcd:
        etcd.etcdctl("role", "add", "reader")
        etcd.etcdctl("role", "grant-permission", "reader", "read", "/mooncake-vllm/", "--prefix")
        etcd.etcdctl("user", "add", "reader:pw", "--interactive=false")
        etcd.etcdctl("user", "grant-role", "reader", "reader")
        with open_metadata(etcd.url, ttl_s=3, user="reader", password="pw") as md:
            with pytest.raises(MetadataError, match="permission denied"):
                md.register_instance(make_info("p0"))
            assert md.online  # type: ignore[attr-defined]  # still connected, nothing queued
            assert md.list_instances() == []


def test_tls_server_certificate(tmp_path: Path) -> None:
    with EtcdServer(tmp_path / "etcd", tls=True) as etcd:
        assert etcd.url.startswith("etcds://") and etcd.ca_cert is not None
        with open_metadata(etcd.url, ttl_s=3, ca_cert=str(etcd.ca_cert)) as a, \
                open_metadata(etcd.url, ttl_s=3, **etcd.client_options()) as b:
            a.publish_segment("s", {"name": "s"})
            wait_until(lambda: b.get_segment("s") is not None, 5, "discovery over TLS")
        with pytest.raises(MetadataConfigError, match="ca_cert"):
            open_metadata(etcd.url)  # etcds:// without a CA
        with pytest.raises(MetadataUnavailableError, match=etcd.endpoint):
            open_metadata(f"etcd://{etcd.endpoint}", timeout_s=2)  # plain against TLS
        wrong_ca = EtcdServer(tmp_path / "other", tls=True).ca_cert  # certificates only
        with pytest.raises(MetadataUnavailableError, match=etcd.endpoint):
            open_metadata(etcd.url, ca_cert=str(wrong_ca), timeout_s=2)


def test_mutual_tls_with_auth(tmp_path: Path) -> None:
    with EtcdServer(tmp_path / "etcd", tls=True, client_cert_auth=True, auth=True) as etcd:
        opts = etcd.client_options()
        assert {"ca_cert", "cert", "key", "user", "password"} <= opts.keys()
        with open_metadata(etcd.url, ttl_s=3, **opts) as md:
            md.register_instance(make_info("p0"))
            assert md.get_instance("p0") is not None
        no_cert = {k: v for k, v in opts.items() if k not in ("cert", "key")}
        with pytest.raises(MetadataUnavailableError, match=etcd.endpoint):
            open_metadata(etcd.url, timeout_s=2, **no_cert)
