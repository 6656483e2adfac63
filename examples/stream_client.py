"""Stream an answer from the conductor (or any OpenAI-compatible server) over plain HTTP.

Shows the wire format: a POST with `"stream": true`, answered with server-sent events, one
`data: {json}` line per chunk and `data: [DONE]` at the end. Standard library only.

    python examples/stream_client.py --url http://127.0.0.1:8000 "The capital of France is"
    python examples/stream_client.py --chat "Write a haiku about caches"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any


def first_model(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=timeout_s) as resp:
        models = json.loads(resp.read())["data"]
    if not models:
        raise SystemExit(f"{url}/v1/models lists no model")
    return str(models[0]["id"])


def stream_events(url: str, body: dict[str, Any], timeout_s: float) -> Iterator[dict[str, Any]]:
    """POST `body` and yield each SSE `data:` payload before `[DONE]`."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as e:  # 400 bad request, 503 rejected (Retry-After), ...
        retry = e.headers.get("Retry-After")
        detail = e.read().decode(errors="replace")
        wait = f" (retry after {retry}s)" if retry else ""
        raise SystemExit(f"HTTP {e.code}{wait}: {detail}") from None
    with resp:
        # Read to the end of the body (the server closes it after [DONE]): hanging up early
        # looks like a client that went away. The socket timeout bounds every read.
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue  # blank separators and SSE comments
            payload = line.removeprefix("data:").strip()
            if payload == "[DONE]":
                continue
            event = json.loads(payload)
            if "error" in event:
                raise SystemExit(f"server error mid-stream: {event['error']}")
            yield event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Once upon a time")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the conductor")
    parser.add_argument("--model", default=None, help="default: the first of /v1/models")
    parser.add_argument("--chat", action="store_true", help="use /v1/chat/completions")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per read")
    args = parser.parse_args(argv)

    model = args.model or first_model(args.url, args.timeout)
    body: dict[str, Any] = {"model": model, "max_tokens": args.max_tokens, "stream": True,
                            "temperature": 0.0, "stream_options": {"include_usage": True}}
    if args.chat:
        body["messages"] = [{"role": "user", "content": args.prompt}]
        endpoint = f"{args.url}/v1/chat/completions"
    else:
        body["prompt"] = args.prompt
        endpoint = f"{args.url}/v1/completions"

    start = time.perf_counter()
    first: float | None = None
    usage: dict[str, Any] = {}
    for event in stream_events(endpoint, body, args.timeout):
        usage = event.get("usage") or usage
        for choice in event.get("choices", []):
            text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            if text and first is None:
                first = time.perf_counter() - start
            print(text, end="", flush=True)
    total = time.perf_counter() - start
    print()
    ttft = f"{first * 1e3:.0f} ms" if first is not None else "n/a"
    print(f"[{model}] time to first token {ttft}, total {total:.2f} s, usage {usage}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
