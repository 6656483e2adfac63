"""The cluster token outside the engine: who may send a control frame or transfer parameters.

One secret, the cluster token, is shared by every instance and conductor of a cluster. The
engine proves it in its own TCP handshake (csrc/); this module derives the other uses from it,
one key per purpose, so that a MAC made for one use is never valid for another:

- control frames: every frame on the control channel between P and D workers carries
  HMAC-SHA256(key("control"), frame). A frame without a valid MAC is dropped and logged.
- transfer parameters: the conductor alone writes a request's `kv_transfer_params`; it signs
  them (HMAC over their canonical JSON, with an expiry), and a connector with a token refuses
  parameters that do not carry a valid signature.

Without a token nothing is signed or checked: an instance then listens on loopback only, unless
its operator has set `insecure` (config.py enforces that).

The MACs authenticate, they do not encrypt: KV, prompts and control records cross the network
in clear (README, Security).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import time
from typing import Any

MAC_BYTES = 32
# The shortest cluster (or admin) token accepted anywhere: connector and conductor alike.
MIN_TOKEN_CHARS = 16
# How long signed transfer parameters stay valid: a request may wait in a busy instance's
# queue for a while before its connector first reads them.
PARAMS_TTL_S = 600.0
_MAC_KEY = "mac"
_EXPIRES_KEY = "expires_at"


def derive_key(token: str, purpose: str) -> bytes:
    """A key for one purpose, so that MACs for different uses never stand for each other."""
    return hmac.new(token.encode(), b"mooncake-vllm/v1/" + purpose.encode(),
                    hashlib.sha256).digest()


class FrameAuth:
    """Seals and opens control frames: 32 bytes of HMAC-SHA256, then the frame."""

    def __init__(self, token: str | None) -> None:
        self._key = derive_key(token, "control") if token else None

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def seal(self, frame: bytes) -> bytes:
        if self._key is None:
            return frame
        return hmac.new(self._key, frame, hashlib.sha256).digest() + frame

    def open(self, sealed: bytes) -> bytes:
        """The frame inside, or ValueError naming why it is refused."""
        if self._key is None:
            return sealed
        if len(sealed) < MAC_BYTES:
            raise ValueError(f"frame of {len(sealed)} bytes has no MAC")
        mac, frame = sealed[:MAC_BYTES], sealed[MAC_BYTES:]
        if not hmac.compare_digest(mac, hmac.new(self._key, frame, hashlib.sha256).digest()):
            raise ValueError("bad MAC (not signed with this cluster's token)")
        return frame


def _canonical(params: dict[str, Any]) -> bytes:
    body = {k: v for k, v in params.items() if k != _MAC_KEY}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sign_transfer_params(token: str | None, params: dict[str, Any],
                         ttl_s: float = PARAMS_TTL_S, now: float | None = None) -> dict[str, Any]:
    """`params` with an expiry and the conductor's MAC; unchanged (a copy) without a token."""
    out = {k: v for k, v in params.items() if k not in (_MAC_KEY, _EXPIRES_KEY)}
    if not token:
        return out
    out[_EXPIRES_KEY] = int((time.time() if now is None else now) + ttl_s)
    out[_MAC_KEY] = hmac.new(derive_key(token, "transfer-params"), _canonical(out),
                             hashlib.sha256).hexdigest()
    return out


def transfer_params_refusal(token: str | None, params: dict[str, Any],
                            now: float | None = None) -> str | None:
    """Why these parameters must not be used; None when they may (always, without a token)."""
    if not token:
        return None
    mac = params.get(_MAC_KEY)
    if not isinstance(mac, str):
        return "kv_transfer_params carry no conductor signature (a cluster token is set)"
    want = hmac.new(derive_key(token, "transfer-params"), _canonical(params),
                    hashlib.sha256).hexdigest()
    if not hmac.compare_digest(mac.encode(), want.encode()):
        return "kv_transfer_params signature is not valid for this cluster's token"
    expires = params.get(_EXPIRES_KEY)
    if not isinstance(expires, int) or isinstance(expires, bool):
        return "kv_transfer_params carry no expiry"
    if (time.time() if now is None else now) > expires:
        return f"kv_transfer_params expired at {expires} (unix time)"
    return None


def is_loopback_host(host: str) -> bool:
    """Whether `host` (a listener's, or a client's) is this machine only; an IPv4 loopback
    address seen through a dual-stack socket (::ffff:127.0.0.1) counts."""
    if host == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    mapped = getattr(addr, "ipv4_mapped", None)
    return bool((mapped or addr).is_loopback)


def is_wildcard_host(host: str) -> bool:
    """Whether `host` is an address a server binds to but nobody can connect to (0.0.0.0, ::)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False
