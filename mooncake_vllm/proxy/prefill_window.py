"""The prefill window: a cap on the prompt tokens in flight at one prefill instance.

vLLM packs everything it has queued into one step, up to its token budget. A burst that
reaches a prefill instance at once is therefore prefilled in one big step, and every request
of it gets its first token only when the whole burst is done. A single vLLM instance serving
the same burst with chunked prefill finishes its first requests early, in arrival order.
The window restores that order for disaggregated serving: the conductor sends a request's two
halves only once its prefill tokens fit in the window, so P works through a burst a few
requests at a time and D's halves arrive in step with P's. Waiting is first come, first
served; a request larger than the window is let through alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class PrefillWindow:
    """FIFO admission of prefill work, counted in prompt tokens. Used on the event loop only."""

    def __init__(self) -> None:
        self.in_flight = 0  # tokens admitted and not yet released
        self.waited = 0  # requests that had to wait, since the start
        self.limit = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _fits(self, tokens: int) -> bool:
        return self.in_flight == 0 or self.in_flight + tokens <= self.limit

    async def acquire(self, tokens: int, limit: int) -> None:
        """Return once `tokens` may be sent (at once when the window is off, `limit` <= 0).
        Cancelled while waiting (the client left, a deadline passed): leaves the queue and
        takes nothing."""
        self.limit = limit
        if limit <= 0 or (not self._waiting and self._fits(tokens)):
            self.in_flight += tokens
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (tokens, fut)
        self._waiting.append(entry)
        self.waited += 1
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(tokens)  # admitted in the same instant: give it back
            else:
                with contextlib.suppress(ValueError):  # _admit may have dropped it already
                    self._waiting.remove(entry)
                self._admit()  # the request behind it may fit now
            raise

    def release(self, tokens: int) -> None:
        self.in_flight = max(0, self.in_flight - tokens)
        self._admit()

    def _admit(self) -> None:
        while self._waiting and self._fits(self._waiting[0][0]):
            tokens, fut = self._waiting.popleft()
            if fut.done():  # cancelled, not yet removed by its waiter
                continue
            self.in_flight += tokens
            fut.set_result(None)
