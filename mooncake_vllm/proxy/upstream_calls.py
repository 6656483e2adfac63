"""One call to one instance, up to the point where the client's answer is committed.

`open_upstream` sends a generation request and reads up to its first chunk (or whole answer),
`post_json` sends one whose JSON answer the conductor reads itself (prefill halves, probes),
`relay_stream` passes a committed stream on. Failures are classified here: `UpstreamFailure`
(retry elsewhere; its `public` words are all the client may learn) and `UpstreamRefused` (a
4xx: the request's own fault, relayed through errors.refused_response).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from .conductor import Conductor
from .errors import LOGGED_BODY_BYTES, error_body, refused_response
from .upstreams import Instance

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (aiohttp.ClientConnectionError, OSError)


class UpstreamFailure(Exception):
    """An upstream failed before anything reached the client: try another instance.

    `public` says how, in words fit for the client (no address, nothing the instance sent);
    `detail` is for the log only."""

    def __init__(self, inst: Instance, role: str, kind: str, public: str, detail: str = "",
                 instance_down: bool = False) -> None:
        super().__init__(f"{role} instance {inst.instance_id} ({inst.url}): {public}"
                         + (f"; {detail}" if detail else ""))
        self.inst, self.role, self.kind, self.instance_down = inst, role, kind, instance_down
        self.public = public


class UpstreamRefused(Exception):
    """An upstream answered 4xx: the request itself is at fault; relay the error."""

    def __init__(self, inst: Instance, role: str, status: int, body: bytes) -> None:
        super().__init__(f"{role} instance {inst.instance_id} answered {status}")
        self.response = refused_response(role, inst.instance_id, status, body)


def _server_error(inst: Instance, role: str, status: int, body: bytes) -> UpstreamFailure:
    return UpstreamFailure(inst, role, f"http_{status}", f"answered {status}",
                           f"body {body[:LOGGED_BODY_BYTES]!r}")


@dataclass
class Opened:
    """An upstream answer up to the commit point."""

    resp: aiohttp.ClientResponse
    first: bytes = b""  # the first chunk of a stream
    final: web.Response | None = None  # a complete (non-streamed) answer


def _content_type(resp: aiohttp.ClientResponse) -> str:
    return resp.content_type or "application/json"


def _json_headers(auth: dict[str, str]) -> dict[str, str]:
    return {"Content-Type": "application/json", **auth}


async def open_upstream(c: Conductor, inst: Instance, role: str, path: str, data: bytes,
                        stream: bool, auth: dict[str, str]) -> Opened:
    """Send the request (JSON bytes) and read up to the first chunk (stream) or the whole
    answer."""
    assert c.session is not None
    cfg = c.config
    try:
        resp = await asyncio.wait_for(
            c.session.post(inst.url + path, data=data, headers=_json_headers(auth)),
            cfg.first_token_timeout_s)
    except asyncio.TimeoutError as e:
        raise UpstreamFailure(inst, role, "timeout", "sent no response headers within "
                              f"{cfg.first_token_timeout_s:.0f}s") from e
    except _CONNECTION_ERRORS as e:
        raise UpstreamFailure(inst, role, "connect", "could not be reached",
                              f"{type(e).__name__}: {e}", instance_down=True) from e
    try:
        if resp.status >= 400:
            body = await asyncio.wait_for(resp.read(), cfg.first_token_timeout_s)
            resp.release()
            if resp.status >= 500:
                raise _server_error(inst, role, resp.status, body)
            raise UpstreamRefused(inst, role, resp.status, body)
        if stream and resp.content_type == "text/event-stream":
            first = await asyncio.wait_for(resp.content.readany(), cfg.first_token_timeout_s)
            if not first:
                raise UpstreamFailure(inst, role, "empty", "ended its stream before any data")
            return Opened(resp, first=first)
        answer = await asyncio.wait_for(resp.read(), cfg.first_token_timeout_s)
        resp.release()
        return Opened(resp, final=web.Response(status=resp.status, body=answer,
                                               content_type=_content_type(resp)))
    except asyncio.TimeoutError as e:
        resp.close()
        raise UpstreamFailure(inst, role, "timeout", "sent no first token within "
                              f"{cfg.first_token_timeout_s:.0f}s") from e
    except (aiohttp.ClientError, OSError) as e:
        resp.close()
        raise UpstreamFailure(inst, role, "broken", "broke the connection",
                              f"{type(e).__name__}: {e}",
                              instance_down=isinstance(e, _CONNECTION_ERRORS)) from e
    except BaseException:
        resp.close()  # cancelled (client gone) or refused: vLLM aborts the request
        raise


# Set on a stream response whose client left before the end (counted as such, not as a 200).
CLIENT_GONE = "mooncake_client_gone"


def _sse_error(message: str) -> bytes:
    event = error_body(message, "upstream_error", 502)
    return f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode()


async def relay_stream(c: Conductor, request: web.Request, inst: Instance,
                       opened: Opened,
                       on_chunk: Callable[[bytes], None] | None = None) -> web.StreamResponse:
    """Past the commit point: relay chunks as they come; never buffer the stream. `on_chunk`
    is given each chunk after the first as it arrives (the ITL observer)."""
    out = web.StreamResponse(status=opened.resp.status, headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no"})
    resp = opened.resp
    finished = False
    try:
        await out.prepare(request)
        await out.write(opened.first)
        tail = opened.first[-32:]
        while True:
            try:
                chunk = await asyncio.wait_for(resp.content.readany(), c.config.idle_timeout_s)
            except asyncio.TimeoutError:
                problem = f"no data for {c.config.idle_timeout_s:.0f}s"
            except (aiohttp.ClientError, OSError) as e:
                problem = f"{type(e).__name__}: {e}"
            else:
                if chunk:
                    if on_chunk is not None:
                        on_chunk(chunk)
                    await out.write(chunk)
                    tail = (tail + chunk)[-32:]
                    continue
                if b"[DONE]" in tail:
                    finished = True
                    break
                problem = "stream ended without [DONE]"
            log.warning("instance %s failed mid-stream: %s", inst.instance_id, problem)
            c.metrics.upstream_errors.labels(inst.instance_id, inst.role, "mid_stream").inc()
            await out.write(_sse_error(f"the {inst.role} instance failed mid-stream"))
            break
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        log.info("client went away mid-stream; aborting upstream on %s", inst.instance_id)
        out[CLIENT_GONE] = True
    finally:
        if finished:
            resp.release()
        else:
            resp.close()
    return out

async def post_json(c: Conductor, inst: Instance, role: str, path: str, data: bytes,
                    timeout_s: float, auth: dict[str, str]) -> dict[str, Any]:
    assert c.session is not None
    try:
        async with c.session.post(inst.url + path, data=data, headers=_json_headers(auth),
                                  timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            body = await r.read()
            if r.status >= 500:
                raise _server_error(inst, role, r.status, body)
            if r.status >= 400:
                raise UpstreamRefused(inst, role, r.status, body)
            answer = json.loads(body)
            if not isinstance(answer, dict):
                raise ValueError(f"a JSON {type(answer).__name__}, not an object")
            return answer
    except asyncio.TimeoutError as e:
        raise UpstreamFailure(inst, role, "timeout",
                              f"sent no answer within {timeout_s:.0f}s") from e
    except ValueError as e:
        raise UpstreamFailure(inst, role, "bad_json", "answered something that is not a "
                              "JSON object", str(e)) from e
    except (aiohttp.ClientError, OSError) as e:
        raise UpstreamFailure(inst, role, "connect", "could not be reached",
                              f"{type(e).__name__}: {e}", instance_down=True) from e
