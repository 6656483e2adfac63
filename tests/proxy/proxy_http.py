"""Small HTTP helpers for the proxy tests (stdlib only: the client side is not under test)."""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlparse

from prometheus_client.parser import text_string_to_metric_families


def get_json(url: str, timeout_s: float = 10.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post(url: str, body: Any, timeout_s: float = 120.0, raw: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def sse_events(url: str, body: dict[str, Any], timeout_s: float = 120.0) -> list[Any]:
    """POST a streaming request; return the decoded `data:` events ("[DONE]" kept as a str)."""
    status, headers, data = post(url, body, timeout_s)
    assert status == 200, data[:500]
    assert headers.get("Content-Type", "").startswith("text/event-stream")
    events: list[Any] = []
    for line in data.decode().split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def stream_text(events: list[Any], chat: bool) -> str:
    out = []
    for e in events:
        if isinstance(e, dict):
            for c in e.get("choices", []):
                out.append((c.get("delta") or {}).get("content") or "" if chat else c["text"])
    return "".join(out)


def open_stream(base: str, path: str, body: dict[str, Any],
                timeout_s: float = 60.0) -> tuple[http.client.HTTPConnection, bytes]:
    """Start a streaming request and read until the first event; the caller closes it."""
    u = urlparse(base)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout_s)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()[:300]
    first = resp.readline()  # de-chunked
    return conn, first


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of a Prometheus sample (by sample name) whose labels include `labels`."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                total += s.value
    return total


def wait_for(pred: Any, timeout_s: float, what: str, explain: Any = None,
             interval_s: float = 0.25) -> None:
    """Until `pred()`; else AssertionError naming `what`, with `explain()` (say, log tails)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval_s)
    more = f"\n{explain()}" if explain is not None else ""
    raise AssertionError(f"not within {timeout_s:.0f}s: {what}{more}")


def instance(proxy_url: str, instance_id: str) -> dict[str, Any]:
    _, data = get_json(proxy_url + "/instances")
    for i in data["instances"]:
        if i["instance_id"] == instance_id:
            return dict(i)
    raise KeyError(f"{instance_id} not in {[i['instance_id'] for i in data['instances']]}")


# A plain test server's URL -> the endpoint of its KV cache events (conftest.py starts them).
KV_EVENTS: dict[str, str] = {}
