"""The shape of a `remote_control` record: how a decode worker reaches a prefill instance's
workers (one `tcp://HOST:PORT` control endpoint per TP rank).

It travels from the connector through etcd or a probe answer to the conductor, and from the
conductor inside `kv_transfer_params` to a decode instance: every hop checks it with the
functions here before it connects anywhere. Each returns None when the value may be used,
else why not.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit

# A TP group has a handful of ranks; a record claiming far more is not one the connector wrote.
MAX_CONTROL_ENDPOINTS = 256
MAX_ENDPOINT_CHARS = 300
MAX_REMOTE_CONTROL_BYTES = 64 * 1024


def port_problem(parts: Any, need_port: bool) -> str | None:
    """Of a urlsplit() result: a port in 1..65535 (or none, when none is needed)."""
    try:
        port = parts.port  # raises ValueError for a non-number or one out of range
    except ValueError:
        return "port is not a number in 1..65535"
    if port is None:
        return "no port" if need_port else None
    if not 1 <= port <= 65535:
        return "port is not a number in 1..65535"
    return None


def split_url(url: str) -> Any:
    """urlsplit, or None for what it cannot parse (it raises on e.g. an invalid IPv6 host)."""
    try:
        return urlsplit(url)
    except ValueError:
        return None


# What zmq connects to: tcp://, a host name or an address (IPv6 in brackets), a port. Nothing
# else, not even an empty query, passes.
_ENDPOINT = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]+):\d{1,5}$")


def endpoint_problem(endpoint: Any) -> str | None:
    """A control endpoint: tcp://HOST:PORT."""
    if not isinstance(endpoint, str) or not endpoint:
        return "not a non-empty string"
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        return f"longer than {MAX_ENDPOINT_CHARS} characters"
    if any(ch.isspace() or ord(ch) < 32 for ch in endpoint):
        return "contains whitespace or control characters"
    parts = split_url(endpoint)
    if parts is None:
        return "not a URL"
    if parts.scheme != "tcp":
        return f"scheme {parts.scheme!r} is not tcp"
    if not parts.hostname:
        return "no host"
    if not _ENDPOINT.match(endpoint):
        return "has more than tcp://HOST:PORT"
    return port_problem(parts, need_port=True)


def remote_control_problem(rc: Any) -> str | None:
    """A prefill instance's control description: an object whose "control" lists its ranks'
    endpoints. The rest of it is the connector's business, but its size is bounded."""
    if not isinstance(rc, dict):
        return f"not an object but {type(rc).__name__}"
    control = rc.get("control")
    if not isinstance(control, list) or not control:
        return "'control' is not a non-empty list"
    if len(control) > MAX_CONTROL_ENDPOINTS:
        return f"'control' lists more than {MAX_CONTROL_ENDPOINTS} endpoints"
    for i, endpoint in enumerate(control):
        problem = endpoint_problem(endpoint)
        if problem:
            return f"control[{i}] {endpoint!r:.80}: {problem}"
    try:
        size = len(json.dumps(rc))
    except (TypeError, ValueError):
        return "not JSON-serialisable"
    if size > MAX_REMOTE_CONTROL_BYTES:
        return f"{size} bytes of JSON, more than {MAX_REMOTE_CONTROL_BYTES}"
    return None
