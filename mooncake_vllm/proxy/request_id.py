"""A request's id, from the client's `X-Request-Id` or made here, unique while in flight.

The id goes upstream as `X-Request-Id` to P and D: vLLM builds its own request id from it
(`cmpl-<id>-0-<random>`), which is what the connector's log lines name, so one grep finds a
request in the logs of the conductor, P and D. It is answered to the client in the same
header. vLLM aborts by that header-derived id, so two requests in flight with one id would
abort each other on an instance: a client id already in flight here gets a suffix.
"""

from __future__ import annotations

import re
import uuid

HEADER = "X-Request-Id"
MAX_CHARS = 128
# What may travel into other processes' logs and headers unchanged.
_SAFE = re.compile(rf"[A-Za-z0-9._:@-]{{1,{MAX_CHARS}}}")


class RequestIds:
    """The ids in flight at this conductor."""

    def __init__(self) -> None:
        self._in_flight: set[str] = set()

    def claim(self, asked: str | None) -> str:
        """The client's id when it is safe and not in flight, else a new one (the client's
        with a suffix when it was only taken)."""
        if asked is None or not _SAFE.fullmatch(asked):
            rid = uuid.uuid4().hex
        else:
            rid = asked
            while rid in self._in_flight:
                rid = f"{asked[:MAX_CHARS - 9]}.{uuid.uuid4().hex[:8]}"
        self._in_flight.add(rid)
        return rid

    def release(self, rid: str) -> None:
        self._in_flight.discard(rid)

    def __len__(self) -> int:
        return len(self._in_flight)
