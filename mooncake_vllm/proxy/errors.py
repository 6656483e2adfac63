"""Error answers in the OpenAI shape, and what of an upstream's error a client may see.

An upstream's error body is never passed on as it came: the instance may be anything discovery
or a misconfiguration points at. A 4xx from vLLM (the request's own fault) keeps its message
and type, read out of vLLM's error object; anything else becomes a generic message naming the
instance's role and status, and the body goes to the log, truncated.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

LOGGED_BODY_BYTES = 300
MAX_RELAYED_MESSAGE_CHARS = 2000


def error_body(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": code}}


def error_response(status: int, message: str, kind: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(error_body(message, kind, status), status=status, headers=headers)


def _vllm_error(data: bytes) -> tuple[str, str] | None:
    """(message, type) of an OpenAI-style error object, as vLLM answers; None otherwise."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict):
        return None
    err = obj.get("error", obj)  # {"error": {...}}, {"error": "..."}, or {"object": "error", ...}
    if isinstance(err, str):
        return err, "invalid_request_error"
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        kind = err.get("type")
        return err["message"], kind if isinstance(kind, str) else "invalid_request_error"
    return None


def refused_response(role: str, instance_id: str, status: int, data: bytes) -> web.Response:
    """The client's answer to an upstream 4xx."""
    found = _vllm_error(data)
    if found is None:
        log.warning("%s instance %s answered %d: %r", role, instance_id, status,
                    data[:LOGGED_BODY_BYTES])
        return error_response(status, f"the {role} instance refused the request ({status})",
                              "invalid_request_error")
    message, kind = found
    return error_response(status, message[:MAX_RELAYED_MESSAGE_CHARS], kind[:100])
