"""One request's path through the conductor.

Disaggregated: make a transfer id; send the prefill instance the request with `max_tokens=1`,
`stream=false` and `kv_transfer_params={do_remote_decode, transfer_id}`, and at the same time the
decode instance the request with `{do_remote_prefill, transfer_id, remote_control}`; relay the
decode instance's answer. Pipelined: the same, but P is sent only the prompt's first N token
ids and D all of them with `pipeline_tokens: N`. Alone ("both" instance): relay that instance's
answer. Client-sent `kv_transfer_params` never reach an instance; the conductor's own are
signed with the cluster token when there is one (transfer_params.py). Every upstream request
carries the client's Authorization header.

Failure rules:
- Until the first byte of the answer has been written to the client nothing is committed: an
  upstream that fails (connection error, 5xx, deadline, stream ending empty) makes the request
  start over on other instances (both halves, with a new transfer id), up to `max_attempts`.
- After that, an upstream failure ends the stream with an SSE error event.
- An upstream 4xx is the client's fault: relayed (vLLM's error message and type), no retry.
- Upstream error bodies and addresses stay in the log: the client learns which role failed and
  how (status, deadline, connection), not what the instance said (errors.py).
- The client going away cancels the handler; every upstream response is then closed, which
  makes vLLM abort the request and free its KV.
- Every wait has a deadline: connect, probe, prefill, first token, and the gap between chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from aiohttp import web

from mooncake_vllm.remote_control import remote_control_problem

from . import transfer_params
from .access import client_auth, conductor_auth
from .admission import Outcome, Verdict
from .conductor import Conductor, Route
from .errors import error_response
from .health import mark_down
from .limits import encode_json, run_sized
from .model_shape import shape_in_answer
from .prompt import PromptKey
from .request_id import HEADER as REQUEST_ID_HEADER
from .tokenize import TokenizeFailed, tokenize
from .upstream_calls import (
    Opened,
    UpstreamFailure,
    UpstreamRefused,
    open_upstream,
    post_json,
    relay_stream,
)
from .upstreams import Instance, PrefillTicket, decode_slot

log = logging.getLogger(__name__)


def one_sequence(body: dict[str, Any]) -> bool:
    """Whether a request asks for one sequence from one prompt (what one transfer can carry)."""
    prompt = body.get("prompt")
    several_prompts = isinstance(prompt, list) and bool(prompt) and not all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    return (body.get("n", 1) in (1, None) and body.get("best_of", 1) in (1, None)
            and not several_prompts)


def pipelinable(path: str, body: dict[str, Any]) -> bool:
    """Whether a request can be cut into a head for P and the rest for D: one plain completion
    prompt (a chat template, several prompts, echo or prompt logprobs would need the whole
    prompt on one instance, or in its original form)."""
    prompt = body.get("prompt")
    return (path == "/v1/completions" and isinstance(prompt, str | list) and bool(prompt)
            and one_sequence(body) and not body.get("echo")
            and body.get("prompt_logprobs") is None)


def token_events(chunk: bytes) -> int:
    """Server-sent events in a read of a completion stream that carry output: every `data:`
    event but the end marker (a usage-only event counts too: it comes once, at the end).
    Events are counted where a line starts: the generated text is JSON inside an event and
    holds no raw newline, so a "data:" in the text is no event."""
    def at_line_start(field: bytes) -> int:
        return chunk.count(b"\n" + field) + chunk.startswith(field)

    return max(at_line_start(b"data:") - at_line_start(b"data: [DONE]"), 0)


def prefill_body(body: dict[str, Any], tid: str, token: str | None = None) -> dict[str, Any]:
    p = dict(body)
    p["max_tokens"] = 1
    if "max_completion_tokens" in p:
        p["max_completion_tokens"] = 1
    p["stream"] = False
    p.pop("stream_options", None)
    p[transfer_params.KEY] = transfer_params.for_prefill(token, tid)
    return p


def _learn_remote_control(inst: Instance, answer: dict[str, Any]) -> None:
    params = answer.get(transfer_params.KEY)
    if inst.model_shape is None:  # static form: the shape comes with every prefill answer
        inst.model_shape = shape_in_answer(inst.instance_id, params)
    rc = params.get("remote_control") if isinstance(params, dict) else None
    if not (isinstance(rc, dict) and rc and (inst.remote_control is None
                                             or inst.remote_control_from_probe)):
        return
    problem = remote_control_problem(rc)
    if problem:
        log.warning("prefill instance %s: remote_control in its answer ignored, %s",
                    inst.instance_id, problem)
        return
    # Every prefill answer carries it: a restarted instance corrects our cache here.
    inst.remote_control, inst.remote_control_from_probe = rc, True


async def remote_control(c: Conductor, inst: Instance, model: Any,
                         client: dict[str, str]) -> dict[str, Any]:
    """P's control description: from discovery, else from a one-token probe (cached). The
    probe carries the conductor's upstream key, or else the client's Authorization."""
    if inst.remote_control:
        return inst.remote_control
    lock = c.probe_locks.setdefault(inst.instance_id, asyncio.Lock())
    async with lock:
        if inst.remote_control:
            return inst.remote_control
        body: dict[str, Any] = {
            "prompt": "probe", "max_tokens": 1, "stream": False,
            transfer_params.KEY: transfer_params.for_probe(c.config.cluster_token),
        }
        if model is not None:
            body["model"] = model
        auth = conductor_auth(c.config.upstream_api_key) or client
        answer = await post_json(c, inst, "prefill", "/v1/completions", encode_json(body),
                                  c.config.probe_timeout_s, auth)
        _learn_remote_control(inst, answer)
        if not inst.remote_control:
            raise UpstreamFailure(
                inst, "prefill", "no_remote_control",
                "gave no usable kv_transfer_params.remote_control: is it running "
                "MooncakeVllmConnector with kv_role kv_producer?")
        return inst.remote_control


class RequestRun:
    """One attempt on one route; records TTFT against the prediction made for it."""

    def __init__(self, c: Conductor, request: web.Request, route: Route, key: PromptKey,
                 path: str, body: dict[str, Any], stream: bool, started: float,
                 size: int = 0) -> None:
        self.c, self.request, self.route, self.key = c, request, route, key
        self.path, self.body, self.stream, self.started = path, body, stream, started
        self.size = size  # bytes of the client's body: large ones are encoded off the loop
        self.rid = str(request.get("request_id", ""))
        # Upstream headers: the client's credentials, and the request id for P's and D's logs.
        self.auth = {**client_auth(request), REQUEST_ID_HEADER: self.rid} if self.rid \
            else client_auth(request)
        self.transfer_id = ""
        self.ticket = PrefillTicket(route.prefill.instance, route.prefill.new_tokens)
        # A pipelined tail is prefill work queued on D too.
        tail = key.num_tokens - route.pipeline_tokens
        self.tail_ticket = (PrefillTicket(route.decode, tail)
                            if route.pipeline_tokens and route.decode is not None else None)
        self._ttft_seen: float | None = None
        self._prefill_done: float | None = None  # seconds after start P's half answered
        self._outcome: Outcome | None = None
        self._chunks: list[float] = []  # when each read of the stream came (first: TTFT)
        self._tokens = 0  # token events in the reads after the first
        self._gap_spanned_prefill = False  # a gap of this stream spanned a prefill on D

    def first_output(self) -> None:
        """The first answer byte is on its way to the client (or the prefill is done)."""
        if self._ttft_seen is not None:
            return
        ttft = self._ttft_seen = time.monotonic() - self.started
        route = self.route
        choice = route.prefill
        if route.decode is None:  # the instance that answers prefilled alone
            choice.instance.ttft.observe(self.ticket.work_tokens, ttft)
        elif self.stream:
            self._observe_pair()
        self._outcome = self.c.admission.record(
            choice.instance.instance_id, route.predicted_ttft_s, ttft, route.path,
            route.predicted_itl_s if self.stream else None, route.idle_ttft_s)
        if self.stream:
            self.c.metrics.ttft.observe(ttft)
            self._chunks.append(time.monotonic())

    def _observe_pair(self) -> None:
        """With both P's answer and D's first token seen: the pair's handoff. Not of a
        pipelined request (D's first token then also waits for D's own tail), nor while D
        computed a prefill of ours (its first token waited for that: D's queue, which the
        plan counts apart, not the handoff)."""
        route, ttft, done = self.route, self._ttft_seen, self._prefill_done
        if route.decode is None or route.pipeline_tokens or ttft is None or done is None:
            return
        if not route.decode.prefill_free_since(self.started + done):
            return
        self.c.observe_handoff(route.prefill.instance, route.decode, ttft - done)

    def on_chunk(self, chunk: bytes) -> None:
        """A read of D's stream: the gap since the last read, spread over the token events it
        holds (a read that waited, on a busy host, holds several), is this request's ITL and
        D's decode step."""
        tokens = token_events(chunk)
        if not tokens:  # the end marker, or part of an event
            return
        now = time.monotonic()
        d = self.route.decode or self.route.prefill.instance
        # Only gaps with no prefill of ours in D's steps: one that spanned a prefill's end
        # (that prefill's own first token may arrive just before this chunk) is left out too.
        if self._chunks:
            if d.prefill_free_since(self._chunks[-1]):
                d.itl.observe(d.decode_batch(), (now - self._chunks[-1]) / tokens, tokens)
            else:
                self._gap_spanned_prefill = True
            self._tokens += tokens
        self._chunks.append(now)

    def stream_ended(self) -> None:
        if self._chunks:
            (self.route.decode or self.route.prefill.instance).observe_output(self._tokens + 1)
        if self._outcome is not None and self._tokens:
            self.c.admission.record_itl(self._outcome,
                                        (self._chunks[-1] - self._chunks[0]) / self._tokens,
                                        decode_only=not self._gap_spanned_prefill)

    async def _relay(self, inst: Instance, opened: Opened) -> web.StreamResponse:
        try:
            return await relay_stream(self.c, self.request, inst, opened, self.on_chunk)
        finally:
            self.stream_ended()

    def close_tickets(self) -> None:
        self.ticket.close()
        if self.tail_ticket is not None:
            self.tail_ticket.close()

    async def alone(self) -> web.StreamResponse:
        inst = self.route.prefill.instance
        try:
            with decode_slot(inst):
                data = await run_sized(self.size, encode_json, self.body)
                opened = await open_upstream(self.c, inst, inst.role, self.path, data,
                                             self.stream, self.auth)
                self.ticket.close()
                if opened.final is not None:
                    return opened.final
                self.first_output()
                return await self._relay(inst, opened)
        finally:
            self.ticket.close()

    async def _prefill(self, p: Instance, pdata: bytes) -> dict[str, Any]:
        try:
            answer = await post_json(self.c, p, "prefill", self.path, pdata,
                                      self.c.config.prefill_timeout_s, self.auth)
            self._prefill_done = time.monotonic() - self.started
            p.ttft.observe(self.ticket.work_tokens, self._prefill_done)  # P's own prefill
            self._observe_pair()
            _learn_remote_control(p, answer)
            if not self.stream:
                self.first_output()  # non-streamed: prefill done is the best TTFT we see
            return answer
        finally:
            self.ticket.close()

    async def _enter_window(self, p: Instance) -> None:
        """Both halves wait together for P's prefill window (see prefill_window.py), so D's
        half arrives in step with P's; bounded by the prefill deadline."""
        limit = self.c.window_limit(p)
        if limit <= 0:
            return
        timeout = self.c.config.prefill_timeout_s
        try:
            await asyncio.wait_for(self.ticket.enter_window(limit), timeout)
        except TimeoutError as e:
            raise UpstreamFailure(
                p, "prefill", "window_timeout",
                f"waited {timeout:.0f}s for its prefill window ({limit} tokens, "
                f"{p.window.in_flight} in flight, {p.window.waiting} waiting)") from e

    async def disaggregated(self) -> web.StreamResponse:
        p, d = self.route.prefill.instance, self.route.decode
        assert d is not None
        cfg = self.c.config
        try:
            rc = await remote_control(self.c, p, self.body.get("model"), self.auth)
            await self._enter_window(p)
            tid = self.transfer_id = uuid.uuid4().hex
            head = self.route.pipeline_tokens
            dbody = dict(self.body)
            dbody[transfer_params.KEY] = transfer_params.for_decode(
                cfg.cluster_token, tid, rc, head, cfg.pipeline_gate)
            pbody = prefill_body(self.body, tid, cfg.cluster_token)
            if head:
                assert self.key.token_ids is not None
                # Both get token ids, so D's first `head` tokens are exactly the ones P
                # computes.
                pbody["prompt"] = list(self.key.token_ids[:head])
                dbody["prompt"] = list(self.key.token_ids)
            pdata, ddata = await run_sized(
                self.size, lambda: (encode_json(pbody), encode_json(dbody)))
        except BaseException:
            self.close_tickets()
            raise
        p_task = asyncio.create_task(self._prefill(p, pdata))
        d_task = asyncio.create_task(open_upstream(self.c, d, "decode", self.path, ddata,
                                                   self.stream, self.auth))
        committed = False
        try:
            with decode_slot(d):
                await asyncio.wait({p_task, d_task}, return_when=asyncio.FIRST_COMPLETED)
                if p_task.done() and p_task.exception() is not None and not d_task.done():
                    raise p_task.exception()  # type: ignore[misc]
                opened = await d_task
                # D answered: P's half is done or finishing; let it end instead of aborting it.
                committed = True
                if opened.final is not None:
                    return opened.final
                self.first_output()
                if self.tail_ticket is not None:  # D's first token: its tail is prefilled
                    self.tail_ticket.close()
                return await self._relay(d, opened)
        finally:
            await _settle(p_task, graceful=committed)
            await _settle(d_task, graceful=False)
            self.close_tickets()  # a task cancelled before it ran never reached its finally


async def _settle(task: asyncio.Task[Any], graceful: bool) -> None:
    """Let a half finish (briefly) after success; cancel it otherwise. Close what it opened."""
    if graceful and not task.done():
        await asyncio.wait({task}, timeout=5.0)
    if not task.done():
        task.cancel()
    with contextlib.suppress(BaseException):
        result = await task
        if isinstance(result, Opened) and not result.resp.closed:
            result.resp.close()


def _refusal(c: Conductor, verdict: Verdict) -> web.StreamResponse:
    if verdict.reason == "itl":
        why = (f"every path is predicted to miss the inter-token latency SLO of "
               f"{c.config.slo_itl_s}s on the decode instances")
    else:
        why = (f"predicted time to first token {verdict.predicted_ttft_s:.2f}s exceeds the "
               f"SLO of {c.config.slo_ttft_s}s")
    return error_response(503, why + "; retry later", "overloaded",
                          headers={"Retry-After": str(verdict.retry_after_s)})


async def exact_key(c: Conductor, body: dict[str, Any], key: PromptKey,
                    auth: dict[str, str]) -> PromptKey:
    """The prompt's key from exact token ids (an instance's /tokenize), so that it can be
    pipelined; the text key when that fails (counted, and the request is not pipelined)."""
    decode = c.registry.usable("decode")
    prompt = body.get("prompt")
    if not decode or not isinstance(prompt, str) or c.session is None:
        return key
    inst = min(decode, key=lambda i: (i.decode_load(), i.instance_id))
    try:  # on the client pool: a burst of these must not crowd out the health checks
        ids = await tokenize(c.session, inst, body.get("model"), prompt,
                             c.config.tokenize_timeout_s, conductor_auth(
                                 c.config.upstream_api_key) or auth)
    except TokenizeFailed as e:
        log.warning("instance %s: %s; this prompt is served on the text path",
                    inst.instance_id, e)
        c.metrics.tokenize.labels("failed").inc()
        return key
    c.metrics.tokenize.labels("ok").inc()
    return c.hasher.from_token_ids(ids)


async def serve(c: Conductor, request: web.Request, path: str, body: dict[str, Any],
                key: PromptKey, size: int = 0) -> web.StreamResponse:
    """Route, admit, and run the request, failing over while nothing has been sent. `size`:
    bytes of the client's body (large ones are encoded off the event loop)."""
    started = time.monotonic()
    body, had_params = transfer_params.without_client_params(body)
    if had_params:
        log.debug("client-sent kv_transfer_params dropped")
        c.metrics.client_params_dropped.inc()
    stream = bool(body.get("stream", False))
    exclude: set[str] = set()
    last: UpstreamFailure | None = None
    can_pipeline = pipelinable(path, body)
    single = one_sequence(body)
    if can_pipeline and key.token_ids is None and c.would_pipeline(key):
        key = await exact_key(c, body, key, client_auth(request))
    key = await c.with_pool(key)
    rechecked = False
    alone = False  # the decode instance failed its half of a P/D attempt: retry it there alone
    for attempt in range(c.config.max_attempts):
        route = c.route(key, exclude, can_pipeline, single, on_decode_alone=alone)
        if route is None and not rechecked and c.health is not None:
            # Nothing in rotation: an instance may have come up since the last health round.
            rechecked = True
            await c.health.recheck_down()
            route = c.route(key, exclude, can_pipeline, single)
        if route is None:
            break
        choice = route.prefill
        if attempt == 0:
            verdict = c.admission.judge(choice.instance.instance_id, route.path,
                                        route.predicted_ttft_s, route.predicted_itl_s,
                                        route.rejected_for, route.idle_ttft_s)
            if not verdict.admit:
                c.path_shares.count("rejected")
                return _refusal(c, verdict)
        m = c.metrics
        m.routing.labels(c.policy.name, choice.instance.role, choice.instance.instance_id).inc()
        if route.decode is not None:
            m.routing.labels(c.policy.name, "decode", route.decode.instance_id).inc()
        if route.pipeline_tokens:
            m.pipelined.inc()
        m.prompt_tokens.inc(key.num_tokens)
        m.cached_tokens.inc(choice.cached_tokens)
        # From now on the chosen instance will hold this prompt's blocks (its head, pipelined).
        held = key.head(route.pipeline_tokens) if route.pipeline_tokens else key
        choice.instance.prefix.insert(held.block_hashes)
        run = RequestRun(c, request, route, key, path, body, stream, started, size)
        try:
            if route.decode is None:
                resp = await run.alone()
            else:
                resp = await run.disaggregated()
            log.info("request %s: %s, %s on %s%s%s, answered %d in %.3fs", run.rid, path,
                     route.path, choice.instance.instance_id,
                     f" then {route.decode.instance_id}" if route.decode is not None else "",
                     f" (transfer {run.transfer_id})" if run.transfer_id else "", resp.status,
                     time.monotonic() - started)
            c.path_shares.count(route.path)
            return resp
        except UpstreamRefused as e:
            log.info("request %s: refused by %s", run.rid, e)
            return e.response
        except UpstreamFailure as e:
            last = e
            log.warning("request %s: attempt %d failed: %s", run.rid, attempt + 1, e)
            m.upstream_errors.labels(e.inst.instance_id, e.role, e.kind).inc()
            m.failovers.labels(e.role).inc()
            if (route.decode is not None and e.role == "decode" and not alone
                    and e.kind.startswith("http_5") and not e.instance_down):
                # Answered with a server error to its half of a P/D request (a failed KV load,
                # with kv_load_failure_policy=fail): nothing reached the client yet, and the
                # instance answers. Prefilled there alone, the request needs no transfer.
                alone = True
                log.warning("request %s: retried on the decode instance %s alone (prefilled "
                            "there, no KV transfer)", run.rid, e.inst.instance_id)
                continue
            if e.instance_down:
                mark_down(e.inst, str(e), m)
            exclude.add(e.inst.instance_id)
    if last is not None:
        c.path_shares.count("failed")
        return error_response(502, f"upstream failed on every attempt; last: the {last.role} "
                              f"instance {last.public}", "upstream_error")
    c.metrics.rejections.labels("no_instance").inc()
    c.path_shares.count("unavailable")
    return error_response(503, "no healthy instance can serve this request "
                          "(need a prefill and a decode instance, or a 'both' instance)",
                          "unavailable", headers={"Retry-After": "1"})
