"""Exact token ids for a text prompt from an instance's own tokenizer (vLLM's POST /tokenize),
for a conductor run without --tokenizer: a pipelined prefill must cut the prompt at a token.

It costs a round trip, so the conductor asks only for a prompt whose estimated length would
be pipelined; the call has a deadline, and a failure (counted) leaves that request on the
text path, prefilled whole."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from .upstreams import Instance

# The most ids a /tokenize answer may carry (far beyond any context length served today).
MAX_TOKENS = 1 << 22


class TokenizeFailed(RuntimeError):
    """The instance did not give usable token ids; the message says why."""


async def tokenize(session: aiohttp.ClientSession, inst: Instance, model: Any, prompt: str,
                   deadline_s: float, auth: dict[str, str]) -> list[int]:
    body: dict[str, Any] = {"prompt": prompt}
    if model is not None:
        body["model"] = model
    try:
        async with session.post(inst.url + "/tokenize", data=json.dumps(body),
                                headers={**auth, "Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=deadline_s)) as r:
            if r.status != 200:
                raise TokenizeFailed(f"/tokenize answered {r.status}")
            answer = json.loads(await r.read())
    except asyncio.TimeoutError as e:
        raise TokenizeFailed(f"/tokenize gave no answer within {deadline_s:g}s") from e
    except (aiohttp.ClientError, OSError, ValueError) as e:
        raise TokenizeFailed(f"/tokenize failed: {type(e).__name__}: {e}") from e
    ids = answer.get("tokens") if isinstance(answer, dict) else None
    if not (isinstance(ids, list) and 0 < len(ids) <= MAX_TOKENS and all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 1 << 31 for t in ids)):
        raise TokenizeFailed("/tokenize answer has no list of token ids")
    return ids
