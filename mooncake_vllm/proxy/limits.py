"""What one client can make the conductor spend: request slots, body bytes, event-loop time.

- Concurrency: at most `max_concurrent_requests` generation requests at once; the next is
  refused at once (503 + Retry-After), before its body is read.
- Body size: at most `max_body_bytes`; a larger declared body is refused (413) before it is
  read, and one without a declared length once it passes the cap. The body must arrive
  within `body_timeout_s` (else 408), so a slow sender cannot keep a slot.
- Event-loop time: the loop serves every request, so work that grows with the body (JSON
  parsing and encoding, tokenizing, prefix hashing) runs in a worker thread for large bodies.
  The GIL still passes between the two threads, so a large body slows the loop instead of
  stopping it; small bodies stay on the loop, where a thread hop would cost more than the work.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from .metrics import ProxyMetrics

T = TypeVar("T")

# Bodies from this size on are parsed and encoded off the event loop. A chat turn or a short
# prompt is well below it; a long document prompt is above.
OFF_LOOP_BYTES = 64 * 1024


class BodyRefused(Exception):
    """The body cannot be taken; `status` and the message are the client's answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: web.Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, or BodyRefused: 413 without reading more than the cap, 408 when it
    does not arrive in time."""
    too_large = BodyRefused(413, f"request body exceeds the conductor's limit of {max_bytes} "
                            "bytes (--max-body-bytes)")
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise too_large
    try:
        # The app's client_max_size is max_bytes + 1: aiohttp stops reading a body of
        # undeclared length as soon as it passes the cap.
        return await asyncio.wait_for(request.read(), timeout_s)
    except web.HTTPRequestEntityTooLarge as e:
        raise too_large from e
    except asyncio.TimeoutError as e:
        raise BodyRefused(408, f"request body not received within {timeout_s:g}s") from e


async def run_sized(size: int, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)`: in a worker thread when `size` (bytes of body) is large, else here."""
    if size >= OFF_LOOP_BYTES:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def encode_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


class ConcurrencyLimit:
    """Slots for generation requests; `try_enter` never waits."""

    def __init__(self, limit: int, metrics: ProxyMetrics) -> None:
        self.limit = limit
        self.in_flight = 0
        self._metrics = metrics

    def try_enter(self) -> bool:
        if self.in_flight >= self.limit:
            self._metrics.rejections.labels("concurrency").inc()
            return False
        self.in_flight += 1
        self._metrics.in_flight.set(self.in_flight)
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        self._metrics.in_flight.set(self.in_flight)
