"""Who may see what, and what the conductor tells upstreams about the caller.

Operator views (`/instances`, `/admission`) show instance URLs and their errors: with an admin
token they need `Authorization: Bearer <token>`; without one they are served to loopback
clients only (an operator on the conductor's host, or a sidecar). `/health` and `/metrics`
stay open: load balancers and Prometheus read them and they name no addresses.

Upstream authorization: a client request carries the client's own `Authorization` header to
the instances, so vLLM's `--api-key` checks the client as it would without the conductor. The
conductor's own calls (health checks, probes for remote_control) use `--upstream-api-key`.
"""

from __future__ import annotations

import hmac

from aiohttp import web

from mooncake_vllm.security import is_loopback_host

from .errors import error_response


def admin_refusal(request: web.Request, admin_token: str | None) -> web.Response | None:
    """None when the caller may see an operator view, else the answer to send instead."""
    if admin_token:
        given = request.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              admin_token.encode()):
            return None
        return error_response(401, "this view needs Authorization: Bearer <admin token>",
                              "unauthorized", headers={"WWW-Authenticate": "Bearer"})
    if request.remote is not None and is_loopback_host(request.remote):
        return None
    return error_response(403, "this view is served to loopback clients only (the conductor "
                          "has no --admin-token)", "forbidden")


def client_auth(request: web.Request) -> dict[str, str]:
    """The headers a client request carries upstream: its Authorization, if any."""
    auth = request.headers.get("Authorization")
    return {"Authorization": auth} if auth else {}


def conductor_auth(api_key: str | None) -> dict[str, str]:
    """The headers of the conductor's own calls to instances."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}
