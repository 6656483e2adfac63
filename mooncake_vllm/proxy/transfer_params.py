"""The `kv_transfer_params` of the requests the conductor forwards: only the conductor writes
them.

A client's own `kv_transfer_params` would steer the instance's connector: make a decode
instance read blocks of another request's transfer, or wait for a transfer that never comes.
So every body loses them on the way in (`without_client_params`), and each half gets the
conductor's, signed with the cluster token when there is one (`mooncake_vllm.security`): a
connector that shares the token refuses parameters without a valid signature.
"""

from __future__ import annotations

from typing import Any

from mooncake_vllm.security import sign_transfer_params

KEY = "kv_transfer_params"
# vLLM copies `vllm_xargs` into the request's extra args, where it also looks for KEY.
XARGS = "vllm_xargs"


def without_client_params(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The body without any client-sent parameters (a copy when it had some), and whether it
    had them."""
    xargs = body.get(XARGS)
    in_xargs = isinstance(xargs, dict) and KEY in xargs
    if KEY not in body and not in_xargs:
        return body, False
    out = {k: v for k, v in body.items() if k != KEY}
    if in_xargs:
        out[XARGS] = {k: v for k, v in xargs.items() if k != KEY}  # type: ignore[union-attr]
    return out, True


def for_prefill(token: str | None, transfer_id: str) -> dict[str, Any]:
    return sign_transfer_params(token, {"do_remote_decode": True, "transfer_id": transfer_id})


def for_probe(token: str | None) -> dict[str, Any]:
    """A one-token request whose answer tells P's remote_control; no transfer follows."""
    return sign_transfer_params(token, {"do_remote_decode": True, "probe": True})


def for_decode(token: str | None, transfer_id: str, remote_control: dict[str, Any],
               pipeline_tokens: int = 0, pipeline_gate: bool = False) -> dict[str, Any]:
    params: dict[str, Any] = {"do_remote_prefill": True, "transfer_id": transfer_id,
                              "remote_control": remote_control}
    if pipeline_tokens:
        params["pipeline_tokens"] = pipeline_tokens
        if pipeline_gate:
            params["pipeline_gate"] = True
    return sign_transfer_params(token, params)
