"""Checks on where the conductor is told to send requests.

Instance records come from the metadata store, which anyone with write access to it can fill:
an unchecked `http_url` would make the conductor post client requests to any address it can
reach (checked here), and an unchecked `remote_control` would make decode instances connect
wherever it says (checked by mooncake_vllm/remote_control.py, shared with the connector).
Each check returns None when the value may be used, else why not (for a warning that names
the field); the caller skips the record.
"""

from __future__ import annotations

from typing import Any

from mooncake_vllm.remote_control import port_problem, split_url


def http_url_problem(url: Any, need_port: bool = True) -> str | None:
    """An instance's base URL: http(s)://HOST:PORT, optionally a path; nothing else."""
    if not isinstance(url, str) or not url:
        return "not a non-empty string"
    if any(ch.isspace() or ord(ch) < 32 for ch in url):
        return "contains whitespace or control characters"
    parts = split_url(url)
    if parts is None:
        return "not a URL"
    if parts.scheme not in ("http", "https"):
        return f"scheme {parts.scheme!r} is not http or https"
    if not parts.hostname:
        return "no host"
    if parts.username is not None or parts.password is not None:
        return "carries credentials"
    if parts.query or parts.fragment:
        return "carries a query or fragment"
    return port_problem(parts, need_port)
