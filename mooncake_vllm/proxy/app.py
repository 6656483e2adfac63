"""HTTP routes of the conductor (aiohttp): the OpenAI endpoints, /v1/models, /health, /metrics,
and two JSON views for operators: /instances and /admission (admin token or loopback only,
access.py). A generation request takes a slot (or is refused at once), its body is read up to
the size cap, and a large body is parsed and hashed off the event loop (limits.py)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from .access import admin_refusal, client_auth
from .conductor import Conductor
from .config import ProxyConfig
from .disagg import serve
from .errors import error_response
from .limits import BodyRefused, ConcurrencyLimit, read_body, run_sized
from .prompt import BadRequest, PromptKey
from .request_id import HEADER as REQUEST_ID_HEADER
from .upstream_calls import CLIENT_GONE

log = logging.getLogger(__name__)

CONDUCTOR: web.AppKey[Conductor] = web.AppKey("conductor", Conductor)
SLOTS: web.AppKey[ConcurrencyLimit] = web.AppKey("slots", ConcurrencyLimit)


def _parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest(f"field 'stream' must be true or false, got {body['stream']!r}")
    for name in ("max_tokens", "max_completion_tokens"):
        v = body.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise BadRequest(f"field '{name}' must be a positive integer, got {v!r}")
    return body


def _generation(path: str, chat: bool):  # type: ignore[no-untyped-def]
    endpoint = "chat" if chat else "completions"

    def parse(c: Conductor, raw: bytes) -> tuple[dict[str, Any], PromptKey]:
        body = _parse_body(raw)
        return body, c.hasher.key(chat, body)

    async def handler(request: web.Request) -> web.StreamResponse:
        c, slots = request.app[CONDUCTOR], request.app[SLOTS]
        if not slots.try_enter():
            c.metrics.requests.labels(endpoint, "503").inc()
            return error_response(
                503, f"the conductor is serving its limit of {slots.limit} concurrent "
                "requests (--max-concurrent-requests); retry later", "overloaded",
                headers={"Retry-After": "1"})
        rid = request["request_id"] = c.request_ids.claim(request.headers.get(REQUEST_ID_HEADER))
        try:
            return await admitted(c, request)
        finally:
            slots.leave()
            c.request_ids.release(rid)

    async def admitted(c: Conductor, request: web.Request) -> web.StreamResponse:
        try:
            raw = await read_body(request, c.config.max_body_bytes, c.config.body_timeout_s)
        except BodyRefused as e:
            reason = "body_too_large" if e.status == 413 else "body_timeout"
            c.metrics.rejections.labels(reason).inc()
            c.metrics.requests.labels(endpoint, str(e.status)).inc()
            return error_response(e.status, str(e), "invalid_request_error")
        try:
            body, key = await run_sized(len(raw), parse, c, raw)
        except BadRequest as e:
            c.metrics.requests.labels(endpoint, "bad_request").inc()
            return error_response(400, str(e), "invalid_request_error")
        try:
            resp = await serve(c, request, path, body, key, len(raw))
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client's connection is lost; every
            # upstream response was closed on the way out, which makes vLLM abort.
            log.info("client went away (connection lost); %s request cancelled", endpoint)
            c.metrics.requests.labels(endpoint, "client_gone").inc()
            raise
        outcome = "client_gone" if resp.get(CLIENT_GONE) else str(resp.status)
        c.metrics.requests.labels(endpoint, outcome).inc()
        return resp

    return handler


async def models(request: web.Request) -> web.Response:
    """The union of the models the healthy instances serve (asked live, with a deadline)."""
    c = request.app[CONDUCTOR]
    assert c.session is not None
    insts = [i for i in c.registry if i.healthy]
    auth = client_auth(request)

    async def ask(url: str) -> list[dict[str, Any]]:
        async with c.session.get(url + "/v1/models", headers=auth,  # type: ignore[union-attr]
                                 timeout=aiohttp.ClientTimeout(total=5)) as r:
            return list((await r.json()).get("data", [])) if r.status == 200 else []

    answers = await asyncio.gather(*(ask(i.url) for i in insts), return_exceptions=True)
    merged: dict[str, dict[str, Any]] = {}
    for a in answers:
        if isinstance(a, list):
            for m in a:
                if isinstance(m, dict) and "id" in m:
                    merged.setdefault(m["id"], m)
    if not merged:
        return error_response(503, "no healthy instance answered /v1/models", "unavailable")
    return web.json_response({"object": "list", "data": list(merged.values())})


async def health(request: web.Request) -> web.Response:
    c = request.app[CONDUCTOR]
    up = {r: len(c.registry.usable(r)) for r in ("prefill", "decode", "both")}
    ok = (up["prefill"] and up["decode"]) or up["both"]
    return web.json_response({"status": "ok" if ok else "unavailable", "healthy": up},
                             status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    c = request.app[CONDUCTOR]
    for inst in c.registry:
        c.metrics.queued.labels(inst.instance_id).set(inst.queued_prefill_tokens)
    return web.Response(body=c.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def instances(request: web.Request) -> web.Response:
    c = request.app[CONDUCTOR]
    refused = admin_refusal(request, c.config.admin_token)
    if refused is not None:
        return refused
    return web.json_response({"policy": c.policy.name, "prefix_hashing": c.hasher.mode,
                              "instances": [i.describe() for i in c.registry],
                              "handoff_s": {f"{p} -> {d}": s for (p, d), s in
                                            c.handoff_s.items()}})


async def admission(request: web.Request) -> web.Response:
    c = request.app[CONDUCTOR]
    refused = admin_refusal(request, c.config.admin_token)
    if refused is not None:
        return refused
    return web.json_response(c.admission.report())


def make_app(config: ProxyConfig, conductor: Conductor | None = None) -> web.Application:
    c = conductor or Conductor(config)
    # One byte over the cap: aiohttp refuses a body of client_max_size bytes or more.
    app = web.Application(client_max_size=c.config.max_body_bytes + 1)
    app[CONDUCTOR] = c
    app[SLOTS] = ConcurrencyLimit(c.config.max_concurrent_requests, c.metrics)
    app.router.add_post("/v1/completions", _generation("/v1/completions", chat=False))
    app.router.add_post("/v1/chat/completions", _generation("/v1/chat/completions", chat=True))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/instances", instances)
    app.router.add_get("/admission", admission)

    async def lifecycle(app: web.Application) -> Any:
        await c.start()
        yield
        await c.stop()

    async def answer_request_id(request: web.Request, response: web.StreamResponse) -> None:
        rid = request.get("request_id")
        if rid is not None:
            response.headers[REQUEST_ID_HEADER] = rid

    app.on_response_prepare.append(answer_request_id)
    app.cleanup_ctx.append(lifecycle)
    return app


async def start_server(config: ProxyConfig) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (cleanup() stops it) and the bound port."""
    # handler_cancellation: a client that disconnects cancels its handler at once, even while
    # it waits for a first token, so the upstream requests are aborted promptly.
    runner = web.AppRunner(make_app(config), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    server = site._server  # the bound port when config.port is 0
    port = server.sockets[0].getsockname()[1] if server is not None else config.port
    return runner, int(port)
