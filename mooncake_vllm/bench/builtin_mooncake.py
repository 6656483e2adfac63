"""The peer in `bench serve`: vLLM's own MooncakeConnector, run on the CPU as far as it can.

It needs the `mooncake-transfer-engine-non-cuda` package (the `mooncake.engine` module), and
its worker asks `torch.accelerator.current_device_index()`, which has no answer on a CPU-only
torch: a `sitecustomize.py` put on PYTHONPATH of those two vLLM processes only makes it answer
0. The built-in connector has no conductor of ours; `relay` below is the smallest front door
that speaks its protocol (both halves at once, tied by a transfer id; the decode half names
the prefill instance's engine id and bootstrap server), so both P/D systems are measured
behind one extra HTTP hop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any

from mooncake_vllm.testing.launcher import Launched
from mooncake_vllm.testing.startup import Progress, wait_all_ready
from mooncake_vllm.testing.vllm_server import VllmServer, free_port

PREFILL_ENGINE_ID = "bench-builtin-prefill"
_SITECUSTOMIZE = '''\
# Written by mooncake_vllm.bench.builtin_mooncake for the built-in MooncakeConnector's
# processes only: a CPU torch has no current accelerator device; the connector asks for one.
try:
    import torch

    torch.accelerator.current_device_index = lambda: 0
except Exception:  # noqa: BLE001 - never stop the interpreter from starting
    pass
'''


def start_builtin_pair(model: str, workdir: Path, stack: contextlib.ExitStack,
                       progress: Progress, startup_timeout_s: float, prefill_cores: list[int],
                       decode_cores: list[int], relay_cores: list[int]
                       ) -> tuple[str, list[VllmServer], Launched]:
    """Start P, D (each confined to its cores) with MooncakeConnector, and the relay; returns
    the relay's URL, the servers and the relay's process."""
    import mooncake.engine  # noqa: F401 - fail here, clearly, when the package is missing

    site = workdir / "sitecustomize"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    bootstrap_port = free_port()
    env = {"PYTHONPATH": str(site), "VLLM_HOST_IP": "127.0.0.1",
           "VLLM_MOONCAKE_BOOTSTRAP_PORT": str(bootstrap_port)}
    servers = []
    for role, kv_role, cores in (("prefill", "kv_producer", prefill_cores),
                                 ("decode", "kv_consumer", decode_cores)):
        kv: dict[str, Any] = {"kv_connector": "MooncakeConnector", "kv_role": kv_role,
                              "kv_connector_extra_config": {"mooncake_protocol": "tcp"}}
        if role == "prefill":
            kv["engine_id"] = PREFILL_ENGINE_ID
        server = VllmServer(model, kv_transfer_config=kv, cpus=cores, env=env, pin_process=True,
                            name=f"builtin-{role}", log_path=workdir / f"builtin-{role}.log")
        stack.callback(server.stop)
        servers.append(server.start())
    wait_all_ready(servers, progress, startup_timeout_s)

    port = free_port()
    relay = Launched(
        [sys.executable, "-m", "mooncake_vllm.bench.builtin_mooncake", "--port", str(port),
         "--prefill", servers[0].url, "--decode", servers[1].url,
         "--bootstrap", f"http://127.0.0.1:{bootstrap_port}", "--engine-id", PREFILL_ENGINE_ID],
        name="builtin-relay", log_path=workdir / "relay.log", cpus=relay_cores)
    stack.callback(relay.stop)
    url = f"http://127.0.0.1:{port}"
    relay.start().wait_http(f"{url}/health", timeout_s=30)
    return url, servers, relay


# ---------------------------------------------------------------------------- the relay
def make_app(prefill: str, decode: str, bootstrap: str, engine_id: str) -> Any:
    import aiohttp
    from aiohttp import web

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tid = uuid.uuid4().hex
        p_body = {**body, "max_tokens": 1, "stream": False,
                  "kv_transfer_params": {"do_remote_decode": True, "transfer_id": tid}}
        p_body.pop("stream_options", None)
        d_body = {**body, "kv_transfer_params": {
            "do_remote_prefill": True, "transfer_id": tid, "remote_engine_id": engine_id,
            "remote_bootstrap_addr": bootstrap}}
        session: aiohttp.ClientSession = request.app["session"]
        timeout = aiohttp.ClientTimeout(total=600)

        async def run_prefill() -> None:
            async with session.post(f"{prefill}/v1/completions", json=p_body,
                                    timeout=timeout) as r:
                await r.read()
                if r.status != 200:
                    raise web.HTTPBadGateway(text=f"prefill: HTTP {r.status}")

        prefill_task = asyncio.create_task(run_prefill())
        out = web.StreamResponse()
        try:
            async with session.post(f"{decode}/v1/completions", json=d_body,
                                    timeout=timeout) as r:
                out.set_status(r.status)
                out.content_type = r.content_type
                await out.prepare(request)
                async for chunk in r.content.iter_any():
                    await out.write(chunk)
            await prefill_task
        finally:
            prefill_task.cancel()
        await out.write_eof()
        return out

    async def on_startup(app: web.Application) -> None:
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/v1/completions", completions)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main(argv: list[str] | None = None) -> int:
    from aiohttp import web

    ap = argparse.ArgumentParser(description="relay for vLLM's built-in MooncakeConnector")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefill", required=True)
    ap.add_argument("--decode", required=True)
    ap.add_argument("--bootstrap", required=True, help="http://HOST:PORT of P's bootstrap server")
    ap.add_argument("--engine-id", required=True)
    args = ap.parse_args(argv)
    print(json.dumps(vars(args)), flush=True)
    web.run_app(make_app(args.prefill, args.decode, args.bootstrap, args.engine_id),
                host="127.0.0.1", port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
