"""Checks on an etcd command line, shared by the compose and the Kubernetes tests.

What "etcd runs with TLS" means for deploy/: every client listener and advertised URL is
https, etcd demands client certificates (--client-cert-auth) signed by the CA it is given
(--trusted-ca-file) and serves its own certificate (--cert-file/--key-file); self-signed
auto-TLS (which verifies nobody) is not used; and where it has a peer listener, the same holds
for peers (--peer-client-cert-auth, --peer-trusted-ca-file, https peer URLs).
"""

from __future__ import annotations

from collections.abc import Sequence

TRUE = ("true", "1")


def flag_values(command: Sequence[str]) -> dict[str, str]:
    """`--name=value` -> {name: value}; a bare `--name` -> {name: "true"}. Later flags win,
    as with etcd's own parser."""
    flags: dict[str, str] = {}
    for arg in command:
        if not arg.startswith("--"):
            continue
        name, sep, value = arg[2:].partition("=")
        flags[name] = value if sep else "true"
    return flags


def _urls(value: str) -> list[str]:
    return [u.strip() for u in value.split(",") if u.strip()]


def _cluster_urls(value: str) -> list[str]:
    return [part.partition("=")[2] for part in _urls(value)]


def etcd_tls_problems(command: Sequence[str]) -> list[str]:
    """Everything about this etcd command line that falls short of the rule above."""
    flags = flag_values(command)
    problems: list[str] = []

    def need_https(name: str, urls: list[str]) -> None:
        if not urls:
            problems.append(f"--{name} is not set")
        problems.extend(f"--{name}: {u} is not https" for u in urls if not u.startswith("https://"))

    def need_file(name: str) -> None:
        if not flags.get(name):
            problems.append(f"--{name} is not set")

    def need_true(name: str) -> None:
        if flags.get(name, "false").lower() not in TRUE:
            problems.append(f"--{name} is not set")

    need_https("listen-client-urls", _urls(flags.get("listen-client-urls", "")))
    need_https("advertise-client-urls", _urls(flags.get("advertise-client-urls", "")))
    for name in ("cert-file", "key-file", "trusted-ca-file"):
        need_file(name)
    need_true("client-cert-auth")
    for name in ("auto-tls", "peer-auto-tls"):
        if flags.get(name, "false").lower() in TRUE:
            problems.append(f"--{name}: self-signed certificates, nobody is verified")
    if "listen-peer-urls" in flags or "initial-cluster" in flags:
        need_https("listen-peer-urls", _urls(flags.get("listen-peer-urls", "")))
        need_https("initial-advertise-peer-urls",
                   _urls(flags.get("initial-advertise-peer-urls", "")))
        need_https("initial-cluster", _cluster_urls(flags.get("initial-cluster", "")))
        for name in ("peer-cert-file", "peer-key-file", "peer-trusted-ca-file"):
            need_file(name)
        need_true("peer-client-cert-auth")
    return problems


def file_flags(command: Sequence[str]) -> dict[str, str]:
    """The flags that name a file etcd reads its TLS material from."""
    names = ("cert-file", "key-file", "trusted-ca-file",
             "peer-cert-file", "peer-key-file", "peer-trusted-ca-file")
    flags = flag_values(command)
    return {n: flags[n] for n in names if flags.get(n)}
