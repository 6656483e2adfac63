"""Turn a request's prompt into prefix block hashes, the unit of cache-aware routing.

Decision: tokenize in the conductor with the model's own tokenizer
(`transformers.AutoTokenizer` from `--tokenizer`, usually the served model's path) when one is
given, because then blocks are exactly the token blocks vLLM caches and token counts are exact.
Without a tokenizer the prompt text is hashed in fixed character chunks, and tokens are
estimated at 4 characters each: prefixes shared as text are still recognised, which is all
routing needs. Asking an instance's `/tokenize` for every request was rejected: it adds a
network round trip to every TTFT and load to the instances we are trying to spare; the
conductor asks only for a prompt it would pipeline, which needs exact ids (tokenize.py).

Hashes chain (each block's hash covers everything before it), so equal hashes mean equal
prefixes, as in vLLM's own prefix cache. Only full blocks count: vLLM caches only those.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CHARS_PER_TOKEN_ESTIMATE = 4


class BadRequest(ValueError):
    """The client's request is malformed; the message says what is wrong (answered with 400)."""


@dataclass(frozen=True)
class PromptKey:
    block_hashes: tuple[int, ...]
    num_tokens: int
    tokens_per_block: int
    # The exact token ids, when the conductor tokenized (or was given) them; None when the
    # prompt was hashed as text. A pipelined prefill needs them to cut the prompt.
    token_ids: tuple[int, ...] | None = None
    # Tokens of the prefix the KV pool holds, per pool identity (pool_view.py): every prefill
    # instance of that identity can fetch them.
    pool_tokens: tuple[tuple[tuple[bytes, bytes], int], ...] = ()

    def pool_tokens_for(self, identity: tuple[bytes, bytes] | None) -> int:
        return next((n for i, n in self.pool_tokens if i == identity), 0) if identity else 0

    def head(self, num_tokens: int) -> PromptKey:
        """The key of the prompt's first `num_tokens` tokens (a whole number of blocks)."""
        blocks = num_tokens // self.tokens_per_block
        ids = self.token_ids[:num_tokens] if self.token_ids is not None else None
        return PromptKey(self.block_hashes[:blocks], num_tokens, self.tokens_per_block, ids)

    @property
    def cacheable_tokens(self) -> int:
        return len(self.block_hashes) * self.tokens_per_block


def chain_digest(prev: bytes, block: bytes) -> bytes:
    """The digest of a block whose predecessor's digest is `prev` (b"" for the first): a
    block's hash covers every token before it."""
    return hashlib.blake2b(prev + block, digest_size=8).digest()


def block_hash(digest: bytes) -> int:
    return int.from_bytes(digest, "little")


def token_block_bytes(ids: Any) -> bytes:
    """A block of token ids as the hasher reads them."""
    return b"".join((int(t) & 0xFFFFFFFF).to_bytes(4, "little") for t in ids)


def _chain(blocks: list[bytes]) -> tuple[int, ...]:
    out: list[int] = []
    prev = b""
    for block in blocks:
        prev = chain_digest(prev, block)
        out.append(block_hash(prev))
    return tuple(out)


def _text_of_content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "".join(parts)
    raise BadRequest(f"{where}: content must be a string or a list of parts, "
                     f"got {type(content).__name__}")


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if msgs is None:
        raise BadRequest("missing field 'messages' (a list of {role, content} objects)")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("field 'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'")
    return msgs


def completion_prompt(body: dict[str, Any]) -> str | list[int]:
    """The prompt as text or token ids; a list of prompts is keyed by its first."""
    if "prompt" not in body:
        raise BadRequest("missing field 'prompt' (a string, a list of strings, or token ids)")
    p = body["prompt"]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p)
        first = p[0]
        if isinstance(first, str):
            return first
        if isinstance(first, list) and all(isinstance(t, int) for t in first):
            return list(first)
    raise BadRequest("field 'prompt' must be a string, a non-empty list of strings, "
                     "or a list of token ids")


class PromptHasher:
    def __init__(self, tokenizer: str | None, tokens_per_block: int = 32,
                 chars_per_block: int = 128) -> None:
        self.tokens_per_block = tokens_per_block
        self.chars_per_block = chars_per_block
        self._tok: Any = None
        if tokenizer:
            try:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(tokenizer)
            except Exception as e:  # the proxy still routes, only less precisely
                log.warning("tokenizer %s could not be loaded (%s): hashing characters",
                            tokenizer, e)

    @property
    def mode(self) -> str:
        return "tokens" if self._tok is not None else "chars"

    def key(self, chat: bool, body: dict[str, Any]) -> PromptKey:
        if chat:
            msgs = chat_messages(body)
            if self._tok is not None and getattr(self._tok, "chat_template", None):
                plain = [{"role": m["role"], "content": _text_of_content(m.get("content"),
                          f"messages[{i}]")} for i, m in enumerate(msgs)]
                ids = self._tok.apply_chat_template(plain, tokenize=True,
                                                    add_generation_prompt=True)
                if isinstance(ids, Mapping):  # newer transformers: a BatchEncoding (a
                    ids = ids["input_ids"]  # UserDict, not a dict) whose keys list() would give
                return self._from_tokens(list(ids))
            text = "".join(f"{m['role']}: {_text_of_content(m.get('content'), f'messages[{i}]')}\n"
                           for i, m in enumerate(msgs))
            return self._from_text(text)
        prompt = completion_prompt(body)
        if isinstance(prompt, list):
            return self._from_tokens(prompt)
        if self._tok is not None:
            return self._from_tokens(list(self._tok.encode(prompt)))
        return self._from_text(prompt)

    def from_token_ids(self, ids: list[int]) -> PromptKey:
        """The key of a prompt whose exact token ids are known (e.g. from /tokenize)."""
        return self._from_tokens(ids)

    def _from_tokens(self, ids: list[int]) -> PromptKey:
        n = self.tokens_per_block
        blocks = [token_block_bytes(ids[i:i + n]) for i in range(0, len(ids) - n + 1, n)]
        return PromptKey(_chain(blocks), len(ids), n, tuple(int(t) for t in ids))

    def _from_text(self, text: str) -> PromptKey:
        n = self.chars_per_block
        data = text.encode("utf-8", errors="replace")
        blocks = [data[i:i + n] for i in range(0, len(data) - n + 1, n)]
        est_tokens = max(1, len(data) // CHARS_PER_TOKEN_ESTIMATE)
        return PromptKey(_chain(blocks), est_tokens, max(1, n // CHARS_PER_TOKEN_ESTIMATE))
