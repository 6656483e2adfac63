"""A stand-in for a vLLM instance, for tests of what the conductor sends and answers: it
records every request (path, headers, JSON body) and answers like vLLM's OpenAI server, on a
real socket. Used on the test's own event loop, with the conductor in the same process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from mooncake_vllm.proxy.app import make_app
from mooncake_vllm.proxy.conductor import Conductor
from mooncake_vllm.proxy.config import ProxyConfig

MODEL = "fake-model"


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeInstance:
    """`remote_control`: what a prefill answer carries. `fail`: (status, body) answered to
    every generation request instead. `hold`: generation requests wait for it to be set.
    `token_ids`: what POST /tokenize answers (None: 404, as a server without it)."""

    remote_control: dict[str, Any] | None = None
    token_ids: list[int] | None = None
    fail: tuple[int, bytes] | None = None
    # (status, body) answered to a decode half (do_remote_prefill) only: a failed KV load.
    fail_remote_prefill: tuple[int, bytes] | None = None
    hold: asyncio.Event | None = None
    metrics_text: str = ""  # what GET /metrics answers
    seen: list[Seen] = field(default_factory=list)
    url: str = ""
    _runner: web.AppRunner | None = None

    def generation(self) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith("/v1/") and s.body is not None]

    async def _record(self, request: web.Request) -> Any:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        self.seen.append(Seen(request.path, dict(request.headers), body))
        return body

    async def _generate(self, request: web.Request) -> web.Response:
        body = await self._record(request)
        if self.hold is not None:
            await self.hold.wait()
        params = body.get("kv_transfer_params") if isinstance(body, dict) else None
        failing = self.fail
        if isinstance(params, dict) and params.get("do_remote_prefill"):
            failing = failing or self.fail_remote_prefill
        if failing is not None:
            status, data = failing
            return web.Response(status=status, body=data, content_type="text/plain")
        answer: dict[str, Any] = {"id": "cmpl-1", "object": "text_completion", "model": MODEL,
                                  "choices": [{"index": 0, "text": " done"}]}
        if isinstance(params, dict) and params.get("do_remote_decode"):
            answer["kv_transfer_params"] = {"remote_control": self.remote_control}
        return web.json_response(answer)

    async def _get(self, request: web.Request) -> web.Response:
        await self._record(request)
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": MODEL}]})
        if request.path == "/metrics":
            return web.Response(text=self.metrics_text)
        return web.Response(text="")

    async def _tokenize(self, request: web.Request) -> web.Response:
        await self._record(request)
        if self.token_ids is None:
            return web.Response(status=404, text="Not Found")
        return web.json_response({"tokens": self.token_ids, "count": len(self.token_ids),
                                  "max_model_len": 4096})

    async def start(self) -> FakeInstance:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/tokenize", self._tokenize)
        for path in ("/health", "/metrics", "/v1/models"):
            app.router.add_get(path, self._get)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()


def rc_for(port: int) -> dict[str, Any]:
    """A remote_control of the shape the connector announces."""
    return {"v": 1, "engine_id": "e1", "control": [f"tcp://127.0.0.1:{port}"], "tp_size": 1}


@asynccontextmanager
async def conductor_at(config: ProxyConfig,
                       conductor: Conductor | None = None) -> AsyncIterator[tuple[str, Conductor]]:
    """The conductor serving on a free loopback port, in this process: (its URL, its state)."""
    c = conductor or Conductor(config)
    runner = web.AppRunner(make_app(config, c), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", c
    finally:
        await runner.cleanup()
