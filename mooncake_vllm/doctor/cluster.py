"""`mooncake-vllm doctor --metadata-server URL` (or `--prefill URL --decode URL`): is this
P/D cluster able to serve, checked from here and from each instance's own side.

Each check yields a `Finding`: what was checked, on what, what was seen, and, when it failed,
the fix. The checks, in order (a later one runs only where the ones it depends on passed):
1. metadata: etcd reachable with these credentials, and the instances registered in the
   namespace (p2p: each URL answers and names its workers' control endpoints, asked with a
   signed one-token probe as a conductor does);
2. each instance: its advertised HTTP address is one others can use, /health answers from
   here, and each worker answers a Ping sealed with this cluster token (nothing listening,
   a token mismatch and an unhealthy worker are told apart);
3. each prefill-decode pair: the KV layouts agree (model, dtype, block size, layers, KV
   heads, head size, TP size), the decode worker reaches the prefill worker's control
   endpoint from its side, and the prefill worker writes into the decode worker's scratch
   region through the engine (the direction KV flows; never KV memory), timed.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mooncake_vllm.channel.control_channel import NoAnswer, Refused, endpoint_refusal
from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.control import ask_worker, ping
from mooncake_vllm.security import is_loopback_host, is_wildcard_host, sign_transfer_params

HTTP_TIMEOUT_S = 5.0
PING_TIMEOUT_S = 3.0
CHECK_TIMEOUT_S = 30.0
TOKEN_FIX = ("give the doctor and every instance the same cluster token "
             "(MOONCAKE_VLLM_CLUSTER_TOKEN, or the connector's cluster_token)")
# What two instances must agree on to exchange KV blocks (model_shape keys).
SHAPE_KEYS = ("dtype", "block_size", "num_layers", "num_kv_heads", "head_dim")


@dataclass
class Finding:
    check: str
    subject: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass
class Member:
    """An instance as the doctor sees it."""

    name: str
    role: str
    http_url: str
    model: str = ""
    controls: list[str] = field(default_factory=list)
    shape: dict[str, Any] | None = None
    reachable: bool = True  # every worker answered its Ping

    def serves(self, role: str) -> bool:
        return self.role in (role, "both")


def _host(url_or_endpoint: str) -> str:
    text = url_or_endpoint.removeprefix("tcp://")
    parts = urlsplit(text if "//" in text else f"//{text}")
    return parts.hostname or ""


def _address_problem(host: str, what: str, metadata_host: str | None) -> str | None:
    """Why peers elsewhere could not use an address an instance advertises."""
    if not host:
        return f"{what} has no host"
    if is_wildcard_host(host):
        return f"{what} host {host} is a wildcard address: nobody can connect to it"
    if is_loopback_host(host) and metadata_host is not None \
            and not is_loopback_host(metadata_host):
        return (f"{what} host {host} is loopback while the metadata server {metadata_host} is "
                "not: instances on other hosts find it there and cannot reach it")
    return None


def _http(url: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=HTTP_TIMEOUT_S) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# ---------------------------------------------------------------------- membership

def members_from_metadata(url: str, namespace: str | None) -> tuple[list[Member], Finding]:
    from mooncake_vllm.metadata import MetadataError, open_metadata

    subject = f"{url} (namespace {namespace or 'default'})"
    try:
        store = open_metadata(url, namespace=namespace)
    except MetadataError as e:
        return [], Finding("metadata", subject, False, str(e),
                           "check the URL, TLS and credentials (MOONCAKE_VLLM_ETCD_*)")
    try:
        infos = store.list_instances()
    finally:
        store.close()
    members = [Member(i.instance_id, i.role, i.http_url, i.model,
                      list(i.remote_control.get("control") or [i.control_endpoint]),
                      i.model_shape.to_dict() if i.model_shape else None) for i in infos]
    roles = sorted({x.role for x in members})
    return members, Finding("metadata", subject, True,
                            f"{len(members)} instance(s) registered: {', '.join(roles) or '-'}")


def members_from_urls(urls: list[tuple[str, str]], token: str | None
                      ) -> tuple[list[Member], list[Finding]]:
    """p2p: ask each instance where its workers listen, as a static conductor does."""
    members, findings = [], []
    for role, url in urls:
        url = url.rstrip("/")
        try:
            status, raw = _http(url + "/v1/models")
            model = json.loads(raw)["data"][0]["id"] if status == 200 else None
            body = {"prompt": "doctor", "max_tokens": 1, "model": model,
                    "kv_transfer_params": sign_transfer_params(
                        token, {"do_remote_decode": True, "probe": True})}
            status, raw = _http(url + "/v1/completions", body)
        except (OSError, ValueError, KeyError, IndexError) as e:
            findings.append(Finding("http", f"{role} {url}", False, f"cannot ask it: {e}",
                                    "check that the URL is right and the port open from here"))
            continue
        params = (json.loads(raw).get("kv_transfer_params") or {}) if status == 200 else {}
        rc = params.get("remote_control") if isinstance(params, dict) else None
        if not isinstance(rc, dict):
            findings.append(Finding(
                "connector", f"{role} {url}", False,
                f"answered {status} with no remote_control: no MooncakeVllmConnector there, "
                "or it refused this doctor's signed parameters", TOKEN_FIX))
            continue
        members.append(Member(str(rc.get("instance_id") or url), role, url, str(model),
                              list(rc.get("control") or []), params.get("model_shape")))
    return members, findings


# ---------------------------------------------------------------------- instances

def check_member(x: Member, token: str | None, metadata_host: str | None) -> list[Finding]:
    subject = f"{x.role} {x.name}"
    out = []
    why = _address_problem(_host(x.http_url), "advertised URL", metadata_host)
    if why is not None:
        out.append(Finding("address", subject, False, f"{x.http_url}: {why}",
                           "set the connector's advertise_url to an address the conductor "
                           "and the other instances reach"))
    try:
        status, _ = _http(x.http_url + "/health")
        out.append(Finding("http", subject, status == 200, f"{x.http_url}/health: {status}",
                           "" if status == 200 else "see the instance's log"))
    except OSError as e:
        out.append(Finding("http", subject, False, f"{x.http_url}/health: {e}",
                           "is it running, and is the port open from here?"))
    if not x.controls:
        x.reachable = False
        out.append(Finding("control", subject, False, "no control endpoint published",
                           "is it running MooncakeVllmConnector?"))
    for rank, ep in enumerate(x.controls):
        finding = _check_control(f"{subject} tp{rank}", ep, token, metadata_host)
        x.reachable &= finding.ok
        out.append(finding)
    return out


def _check_control(subject: str, ep: str, token: str | None,
                   metadata_host: str | None) -> Finding:
    why = endpoint_refusal(ep) or _address_problem(_host(ep), "control endpoint",
                                                   metadata_host)
    if why is not None:
        return Finding("control", subject, False, why,
                       "set the connector's hostname to an address its peers reach")
    try:
        pong = ping(ep, token, PING_TIMEOUT_S)
    except Refused as e:
        return Finding("control", subject, False, str(e), TOKEN_FIX)
    except NoAnswer as e:
        host, port = ep.removeprefix("tcp://").rsplit(":", 1)
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2.0).close()
        except OSError as conn:
            return Finding("control", subject, False,
                           f"nothing accepts connections at {ep} ({conn})",
                           "the instance is gone or was restarted on new ports: its record "
                           "stays until its lease expires; restart or wait")
        return Finding("control", subject, False, f"{e}, though its port accepts connections: "
                       "the worker is stalled, or an older version that drops frames sealed "
                       "with another cluster token without a word", "see the instance's log; "
                       + TOKEN_FIX)
    if not pong.healthy:
        return Finding("control", subject, False, f"{ep}: not healthy: {pong.reason}",
                       "see the instance's log")
    protocol = (pong.segment or {}).get("protocol", "?")
    return Finding("control", subject, True, f"{ep} answers; engine {protocol}")


# ---------------------------------------------------------------------- pairs

def layout_problem(p: Member, d: Member) -> tuple[str, str] | None:
    """(what differs, the fix) when P's KV cannot go into D's blocks; None when it can."""
    if p.model != d.model:
        return (f"model is {p.model!r} on prefill but {d.model!r} on decode",
                "serve the same model (and served name) on both")
    p_tp, d_tp = len(p.controls), len(d.controls)
    if p_tp != d_tp and (p_tp < d_tp or p_tp % d_tp):
        return (f"tensor-parallel size is {p_tp} on prefill but {d_tp} on decode: a prefill "
                "feeds a decode of the same size or of a size that divides its own",
                "give the prefill a --tensor-parallel-size that is a multiple of the decode's")
    if p.shape is None or d.shape is None:
        return None  # nothing published to compare; the registration checks it
    # KV heads per rank differ between tensor-parallel sizes (the registration checks heads).
    for key in SHAPE_KEYS if p_tp == d_tp else [k for k in SHAPE_KEYS if k != "num_kv_heads"]:
        a, b = p.shape.get(key), d.shape.get(key)
        if a != b:
            flag = {"block_size": "--block-size", "dtype": "--dtype"}.get(key, "the same model")
            return (f"{key} is {a!r} on prefill but {b!r} on decode",
                    f"start both with the same {flag}")
    return None


def check_pair(p: Member, d: Member, token: str | None) -> list[Finding]:
    subject = f"{p.name} -> {d.name}"
    problem = layout_problem(p, d)
    if problem is not None:
        return [Finding("layout", subject, False, problem[0], problem[1])]
    out = [Finding("layout", subject, True, "KV layouts agree")]
    if not (p.reachable and d.reachable):
        return out + [Finding("transfer", subject, False, "not tried: a worker did not answer "
                              "(above)", "fix the control findings first")]
    # Each decode rank with each prefill rank that writes into it (its heads' holders when
    # the prefill's tensor-parallel size is a multiple of the decode's).
    per = len(p.controls) // len(d.controls)
    pairs = [(pr, dr) for dr in range(len(d.controls)) for pr in range(dr * per, (dr + 1) * per)]
    for prank, drank in pairs:
        pc, dc = p.controls[prank], d.controls[drank]
        sub = f"{subject} tp{prank}" if per == 1 else f"{subject} tp{prank}->tp{drank}"
        back = _ask_check(dc, pc, False, token)
        out.append(Finding("decode->prefill", sub, back.ok,
                           "decode reaches prefill's control endpoint" if back.ok
                           else back.reason, "" if back.ok else
                           "open the prefill's control port to the decode host; " + TOKEN_FIX))
        sent = _ask_check(pc, dc, True, token)
        if sent.ok:
            mbps = sent.bytes / sent.seconds / 1e6 if sent.seconds else 0.0
            out.append(Finding("prefill->decode", sub, True,
                               f"{sent.protocol}: {mbps:.0f} MB/s, one-page write "
                               f"{sent.latency_s * 1e3:.2f} ms"))
        else:
            out.append(Finding("prefill->decode", sub, False, sent.reason,
                               "open the decode's engine and control ports to the prefill "
                               "host; both must use one transport (protocol)"))
    return out


def _ask_check(worker: str, peer: str, write: bool, token: str | None) -> m.Checked:
    check = m.Check(m.PROTOCOL_VERSION, uuid.uuid4().hex, peer, write)
    try:
        reply = ask_worker(worker, token, check, CHECK_TIMEOUT_S)
    except NoAnswer as e:
        return m.Checked(m.PROTOCOL_VERSION, check.transfer_id, False, str(e))
    if not isinstance(reply, m.Checked):
        return m.Checked(m.PROTOCOL_VERSION, check.transfer_id, False,
                         f"worker {worker} answered a Check with a {type(reply).__name__} "
                         "(an older version without the doctor's checks?)")
    return reply


def diagnose(members: list[Member], token: str | None,
             metadata_host: str | None) -> list[Finding]:
    out: list[Finding] = []
    for x in members:
        out += check_member(x, token, metadata_host)
    prefill = [x for x in members if x.serves("prefill")]
    decode = [x for x in members if x.serves("decode")]
    for role, found in (("prefill", prefill), ("decode", decode)):
        if not found:
            kv_role = "kv_producer" if role == "prefill" else "kv_consumer"
            out.append(Finding("roles", role, False, f"no {role} instance found",
                               f"start one with kv_role {kv_role} (or kv_both), registered "
                               "in this namespace"))
    for p in prefill:
        for d in decode:
            if p is not d:
                out += check_pair(p, d, token)
    return out
