"""`make demo` / `mooncake-vllm demo`: the whole system on loopback, checked against vLLM alone.

Starts etcd, a prefill and a decode `vllm serve` with MooncakeVllmConnector, each confined to
a core of its own (a cpuset, as a user would lay them out), a plain vLLM instance on both cores
for reference, and two conductors: one with its defaults (no tuning flag), one told to
disaggregate every prompt. Sends a handful of prompts to the reference alone, then the same
prompts through the plain conductor, then (each with a prefix of its own, so that no prefix
cache answers them) through the one that always disaggregates: on an idle decode instance the
defaults serve short prompts locally, and the second pass is what shows KV moving between the
instances. Streaming, greedy; prints the answers, checks them token for token against the
reference, and prints per request the conductor's path, TTFT, decode speed and KV write time,
the KV bytes moved, the exposed transfer time, and what these numbers mean. Exits 0 when
every answer matches, 1 on a mismatch, 2 when the stack could not be started, 130 on Ctrl-C.
Everything it started is stopped on every path out, Ctrl-C and SIGTERM included.

The only forgiven difference is a first divergence at an exact tie between the reference's
top-1 and top-2 logprobs: there the pick depends on floating-point summation order, which
legitimately differs between a batch of one and a disaggregated pair.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from mooncake_vllm.demo_report import (
    Completion,
    DemoResult,
    PoolHit,
    Row,
    TransferLog,
    print_report,
    stream_completion,
)
from mooncake_vllm.testing.conductor_process import ConductorProcess
from mooncake_vllm.testing.launcher import LaunchError
from mooncake_vllm.testing.ports import free_port
from mooncake_vllm.testing.prometheus import chosen_path, path_counts, scrape
from mooncake_vllm.testing.startup import Progress, stop_in_parallel, wait_all_ready
from mooncake_vllm.testing.store_process import StoreProcess
from mooncake_vllm.testing.vllm_server import VllmServer, reset_prefix_caches

LONG_PROMPT = "Layer by layer, " + " ".join(
    f"block {i} of the cache moves from the prefill instance to the decode instance."
    for i in range(48))  # about a thousand tokens
PROMPTS = (
    "The history of the transfer engine begins",
    "Explain why the key-value cache of a transformer grows with the prompt:",
    "def fibonacci(n):",
    "Mooncake separates prefill from decode so that",
    "A",  # a one-token prompt: served correctly whichever path the conductor picks
    LONG_PROMPT,
)
# Unlike the table's prompts (no prefix-cache hits to flatter the table), short and long like
# them, so that every path the conductor may pick has served once before the table.
WARMUP_PROMPTS = ("Warm-up: the first request of an engine",
                  "Warming up, " + " ".join(f"round {i} of the engine's first requests."
                                            for i in range(80)))
CONNECTOR = "MooncakeVllmConnector"
# The second pass: every prompt prefilled on P and its KV moved to D (the conductor's two
# overrides), each prompt after a prefix of its own so that neither instance holds its KV yet.
ALWAYS_PD_FLAGS = ("--local-prefill-max-tokens", "0", "--pipeline-prefill-min-tokens", "0")
ALWAYS_PD_PREFIX = "Once more, through prefill and decode: "
EXIT_OK, EXIT_MISMATCH, EXIT_STARTUP, EXIT_INTERRUPTED = 0, 1, 2, 130


def core_layout() -> dict[str, list[int] | None]:
    """Prefill and decode a core each, as on a cluster they get a machine each; the reference
    both of those cores (it runs while they idle). None: too few cores to confine anything."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return {"prefill": None, "decode": None, "single": None}
    return {"prefill": cores[:1], "decode": cores[1:2], "single": cores[:2]}


def _describe(servers: Sequence[VllmServer]) -> str:
    """Where each server runs and how it is held there, in full (cpuset paths)."""
    return "; ".join(
        f"{s.name} on {s.process.confinement_note if s.process else 'its own'}"
        for s in servers)


def _cores_in_words(servers: Sequence[VllmServer]) -> str:
    if any(s.process is None or s.process.cpus is None for s in servers):
        return "no core of its own for any instance (this host has fewer than two)"
    held = all("by cpuset" in s.process.confinement_note for s in servers if s.process)
    where = ", ".join(f"{s.name} on cores {','.join(map(str, s.cpus))}" for s in servers)
    return where + (", each in a cpuset of its own" if held else
                    " (by affinity only: no cpusets here, so threads may leave their cores)")


def run_demo(model: str, workdir: Path, *, prompts: Sequence[str], max_tokens: int,
             metadata: str, progress: Progress, startup_timeout_s: float,
             request_timeout_s: float) -> DemoResult:
    stack = contextlib.ExitStack()
    try:
        connector_extra: dict[str, Any] = {}
        if metadata == "etcd":
            from mooncake_vllm.testing.etcd_server import EtcdServer

            progress.say("starting etcd")
            etcd = EtcdServer(workdir / "etcd").start()
            stack.callback(etcd.stop)
            progress.say(f"etcd ready at {etcd.url}")
            connector_extra["metadata_server"] = etcd.url
            connector_extra["pool"] = True
            store = StoreProcess(etcd.url, name="demo-store", dram_mib=256,
                                 log_path=workdir / "store.log")
            stack.callback(store.stop)
            store.start()
            progress.say(f"store ready at {store.url} (mooncake-vllm store: the KV pool)")
        layout = core_layout()

        def instance(name: str, role: str | None) -> VllmServer:
            port = free_port()
            kv = None
            if role is not None:
                extra = {**connector_extra, "advertise_url": f"http://127.0.0.1:{port}"}
                kv = {"kv_connector": CONNECTOR, "kv_role": role,
                      "kv_connector_extra_config": extra}
            cpus = layout[name]
            # Dev mode: /reset_prefix_cache, which the pool step uses.
            return VllmServer(model, port=port, kv_transfer_config=kv, name=name, cpus=cpus,
                              pin_process=cpus is not None, log_path=workdir / f"{name}.log",
                              env={"VLLM_SERVER_DEV_MODE": "1"})

        prefill = instance("prefill", "kv_producer")
        decode = instance("decode", "kv_consumer")
        single = instance("single", None)
        servers = (prefill, decode, single)
        stack.callback(stop_in_parallel, servers)
        for server in servers:
            server.start()
        progress.say(f"started 3 vLLM engines on {model}: {_describe(servers)}; "
                     f"logs in {workdir}")
        wait_all_ready(servers, progress, startup_timeout_s)

        if metadata == "etcd":
            proxy_args = ["--metadata-server", connector_extra["metadata_server"]]
        else:
            proxy_args = ["--prefill", prefill.url, "--decode", decode.url]
        passes = {"defaults": proxy_args, "always P/D": [*proxy_args, *ALWAYS_PD_FLAGS]}
        conductors = {}
        for name, args in passes.items():
            log_name = "conductor.log" if name == "defaults" else "conductor-always-pd.log"
            conductors[name] = conductor = ConductorProcess(args, log_path=workdir / log_name)
            stack.callback(conductor.stop)
            conductor.start(timeout_s=60).wait_healthy(timeout_s=60)
            progress.say(f"conductor ready at {conductor.url} (mooncake-vllm proxy "
                         f"{' '.join(args)})")
        prompts_of = {"defaults": list(prompts),
                      "always P/D": [ALWAYS_PD_PREFIX + p for p in prompts]}

        # The first requests of an engine pay one-off costs (kernel selection, allocator
        # growth, the first connection between the engines) worth seconds on a CPU: pay them
        # outside the table. A conductor may also need a moment to discover the instances.
        progress.say("warm-up requests through the conductors and to the single instance")
        for prompt in WARMUP_PROMPTS:
            for conductor in conductors.values():
                _through_conductor(conductor.url, model, prompt, 4, request_timeout_s, 60.0)
            stream_completion(single.url, model, prompt, 4, request_timeout_s)
        received_before = _bytes_received(decode)
        transfer_log = TransferLog(prefill.log_path)

        progress.say("the single instance answers every prompt (prefill and decode idle)")
        pd_cpu, started = _cpu_seconds(prefill, decode), time.monotonic()
        refs = {name: [stream_completion(single.url, model, prompt, max_tokens,
                                         request_timeout_s) for prompt in texts]
                for name, texts in prompts_of.items()}
        pd_cpu, reference_run_s = _cpu_seconds(prefill, decode) - pd_cpu, time.monotonic() - started
        time.sleep(0.5)  # its compute threads may spin a moment after the last request

        rows = []
        reference_cpu, started = _cpu_seconds(single), time.monotonic()
        for name, conductor in conductors.items():
            texts = prompts_of[name]
            for i, (prompt, ref) in enumerate(zip(texts, refs[name], strict=True), 1):
                progress.say(f"prompt {i}/{len(texts)} through the conductor ({name}): "
                             f"{ref.prompt_tokens} tokens")
                before = path_counts(conductor.url)
                got = stream_completion(conductor.url, model, prompt, max_tokens,
                                        request_timeout_s)
                path = chosen_path(before, path_counts(conductor.url))
                # P logs a transfer before D can emit its first token; read it for this row.
                moved = transfer_log.wait_new(1, timeout_s=2.0 if path != "local" else 0.0)
                rows.append(Row(prompt, got, ref, path, moved, conductor=name))
        reference_cpu, pd_run_s = _cpu_seconds(single) - reference_cpu, time.monotonic() - started
        strays = _threads_off_their_cores(servers)  # while the connector's threads still run
        sent = sum(t.bytes for row in rows for t in row.transfers)
        received = _wait_bytes_received(decode, received_before + sent, timeout_s=15)
        pool = None
        if metadata == "etcd":
            progress.say("KV pool: the last prompt again, with both instances' caches emptied")
            pool = _pool_hit(prefill, decode, conductors["always P/D"].url, model,
                             prompts_of["always P/D"][-1], refs["always P/D"][-1], max_tokens,
                             request_timeout_s, transfer_log)
        return DemoResult(rows, received - received_before, _cores_in_words(servers),
                          pd_cpu, reference_cpu, reference_run_s, pd_run_s, *strays,
                          pool=pool)
    finally:
        progress.say("stopping everything")
        with _signals_ignored():  # a second Ctrl-C must not cut the clean-up short
            stack.close()
        progress.say("stopped")


def _pool_hit(prefill: VllmServer, decode: VllmServer, conductor_url: str, model: str,
              prompt: str, ref: Completion, max_tokens: int, timeout_s: float,
              transfer_log: TransferLog) -> PoolHit:
    """Ask `prompt` again once P's and D's prefix caches are empty: P reads it from the pool."""
    reset_prefix_caches([prefill.url, decode.url])
    before = _pool_blocks_loaded(prefill)
    got = stream_completion(conductor_url, model, prompt, max_tokens, timeout_s)
    moved = transfer_log.wait_new(1, timeout_s=2.0)
    after = _pool_blocks_loaded(prefill)
    block = 32  # the tiny model's (testing.vllm_server's --block-size)
    return PoolHit(Row(prompt, got, ref, "disaggregated", moved, conductor="always P/D"),
                   int(after - before) * block)


def _pool_blocks_loaded(server: VllmServer) -> float:
    return sum(v for k, v in scrape(server.url).items()
               if k.partition("{")[0] == "vllm:mooncake_pool_blocks_loaded_total")


def _threads_off_their_cores(servers: Sequence[VllmServer]) -> tuple[int, list[str]]:
    """How many threads were checked, and each one allowed beyond its server's cores."""
    checked, strays = 0, []
    for s in servers:
        if s.process is None or s.process.cpus is None:
            continue
        for tid, cores in s.process.thread_cores().items():
            checked += 1
            if not cores <= set(s.process.cpus):
                strays.append(f"{s.name} thread {tid} may run on cores {sorted(cores)}")
    return checked, strays


def _cpu_seconds(*servers: VllmServer) -> float:
    return sum(s.process.cpu_seconds() for s in servers if s.process is not None)


def _bytes_received(decode: VllmServer) -> float:
    return sum(v for k, v in scrape(decode.url).items()
               if k.startswith("vllm:mooncake_bytes_received"))


def _wait_bytes_received(decode: VllmServer, expected: float, timeout_s: float) -> float:
    """vLLM publishes connector counters with its periodic stats: wait until the bytes the
    prefill instance logged as sent are counted, or show what was counted by the deadline."""
    deadline = time.monotonic() + timeout_s
    got = _bytes_received(decode)
    while got < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        got = _bytes_received(decode)
    return got


def _through_conductor(url: str, model: str, prompt: str, max_tokens: int,
                       timeout_s: float, retry_s: float) -> Completion:
    """A request that is retried for `retry_s` while the conductor answers with an error
    (before it has discovered both instances in etcd, it has nowhere to send it)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return stream_completion(url, model, prompt, max_tokens, timeout_s)
        except RuntimeError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(1.0)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP unwind like Ctrl-C, so every `finally` stops what it
    started (SIGINT too: a shell that starts us in the background leaves it ignored)."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous: dict[int, Callable[..., Any] | int | None] = {}
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _default_model(progress: Progress) -> str:
    from mooncake_vllm.testing.tiny_model import default_model_dir, make_tiny_model

    path = default_model_dir()
    progress.say(f"tiny model: {path} (made once, then reused)")
    return str(make_tiny_model(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mooncake-vllm demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None,
                        help="model directory (or hub name); default: the hub-free tiny Llama")
    parser.add_argument("--metadata", choices=("etcd", "p2p"), default="etcd",
                        help="etcd: instances register and the conductor discovers them; "
                             "p2p: no store, the conductor is given the URLs")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt to send (repeatable); default: a built-in handful")
    parser.add_argument("--workdir", default=None, help="logs and etcd data (default: a temp dir)")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds")
    args = parser.parse_args(argv)

    progress = Progress()
    # Logs stay on failure (they say why); a temporary work dir is removed on success.
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mooncake-vllm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with _signals_as_interrupt():
            model = args.model or _default_model(progress)
            result = run_demo(
                model, workdir, prompts=args.prompt or PROMPTS,
                max_tokens=args.max_tokens, metadata=args.metadata, progress=progress,
                startup_timeout_s=args.startup_timeout, request_timeout_s=args.request_timeout)
        print_report(result)
    except KeyboardInterrupt:
        progress.say(f"interrupted; everything started has been stopped (logs in {workdir})")
        return EXIT_INTERRUPTED
    except LaunchError as e:
        progress.say(f"the stack did not come up: {e}\n(logs in {workdir})")
        return EXIT_STARTUP
    if not result.all_match:
        progress.say(f"FAILED: the disaggregated answers differ from the single instance's "
                     f"(logs in {workdir})")
        return EXIT_MISMATCH
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    progress.say("OK: disaggregated prefill/decode answers equal the single instance's")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
