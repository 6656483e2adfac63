"""The systems `bench serve` compares, each started on the same cores and stopped as a whole.

- `single`: one `vllm serve` on cores 0 and 1;
- `single_1core`: one `vllm serve` on core 0 alone, a reference and not a bar: the compute each
  of P and D has;
- `mooncake_vllm`: P on core 0 and D on core 1 with MooncakeVllmConnector (p2p metadata, the
  default) and the conductor as a new user starts it: `proxy --prefill P --decode D`, with
  only the SLO flags for the goodput sweep (`conductor_flags`);
- `mooncake_vllm_always_pd`: the same servers behind conductors with the override flags that
  disaggregate every whole prompt (what the connector alone achieves);
- `vllm_mooncake`: the same pair with vLLM's built-in MooncakeConnector
  (`builtin_mooncake.py`).
A front door (our conductor, the built-in connector's relay) runs on both of its system's
cores.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mooncake_vllm.bench.goodput import Slos
from mooncake_vllm.testing.conductor_process import ConductorProcess
from mooncake_vllm.testing.launcher import Launched
from mooncake_vllm.testing.ports import free_port
from mooncake_vllm.testing.startup import Progress, wait_all_ready
from mooncake_vllm.testing.vllm_server import VllmServer

SYSTEMS = ("single", "single_1core", "mooncake_vllm", "vllm_mooncake")
BOTH_CORES, PREFILL_CORES, DECODE_CORES = [0, 1], [0], [1]
# The conductor's overrides that turn off every fast path, so every prompt goes whole to P.
ALWAYS_PD_FLAGS = ("--local-prefill-max-tokens", "0", "--pipeline-prefill-min-tokens", "0",
                   "--prefill-window-tokens", "0")
# /reset_prefix_cache is a dev-mode endpoint: the second conductor over our servers gets the
# same prompts as every other system, so the caches are emptied before it runs.
DEV_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}


def slo_flags(slos: Slos) -> list[str]:
    return ["--slo-ttft-s", f"{slos.ttft_s:g}", "--slo-itl-s", f"{slos.itl_s:g}"]


def conductor_flags(slos: Slos) -> dict[str, dict[str, list[str]]]:
    """What each of our two reported systems passes to `mooncake-vllm proxy` besides the
    instances, for the fixed scenarios and for the goodput sweep. The fixed scenarios measure
    TTFT as every other system serves it: no SLO, so no admission (ours exactly as a new user
    starts it); the sweep measures goodput under the SLOs, and our conductor is told them."""
    return {"mooncake_vllm": {"scenarios": [], "sweep": slo_flags(slos)},
            "mooncake_vllm_always_pd": {"scenarios": [*ALWAYS_PD_FLAGS],
                                        "sweep": [*slo_flags(slos), *ALWAYS_PD_FLAGS]}}


@dataclass
class Running:
    """A started system: its servers, and the URL clients send to (None for ours, whose two
    conductors are started one after the other over `servers`)."""

    servers: list[VllmServer]
    url: str | None
    confinement: dict[str, str] = field(default_factory=dict)
    # process groups of every process of the system (servers, front door): what the
    # benchmark itself runs, told apart from other load on the machine (`host_load.py`)
    pgids: set[int] = field(default_factory=set)

    def add(self, name: str, process: Launched | None) -> None:
        self.confinement[name] = _note(process)
        if process is not None and process.pid is not None:
            self.pgids.add(process.pid)


def _note(process: Launched | None) -> str:
    return process.confinement_note if process is not None else "not started"


def _single(name: str, model: str, workdir: Path, stack: contextlib.ExitStack,
            progress: Progress, startup_timeout_s: float) -> Running:
    server = VllmServer(model, cpus=BOTH_CORES if name == "single" else PREFILL_CORES,
                        pin_process=True, name=name, log_path=workdir / f"{name}.log")
    stack.callback(server.stop)
    wait_all_ready([server.start()], progress, startup_timeout_s)
    running = Running([server], server.url)
    running.add(name, server.process)
    return running


def _ours(model: str, workdir: Path, stack: contextlib.ExitStack, progress: Progress,
          startup_timeout_s: float) -> Running:
    servers = []
    for role, kv_role, cores in (("prefill", "kv_producer", PREFILL_CORES),
                                 ("decode", "kv_consumer", DECODE_CORES)):
        kv = {"kv_connector": "MooncakeVllmConnector", "kv_role": kv_role}
        server = VllmServer(model, port=free_port(), kv_transfer_config=kv, cpus=cores,
                            pin_process=True, env=DEV_MODE_ENV, name=role,
                            log_path=workdir / f"{role}.log")
        stack.callback(server.stop)
        servers.append(server.start())
    wait_all_ready(servers, progress, startup_timeout_s)
    running = Running(servers, None)
    for s in servers:
        running.add(s.name, s.process)
    return running


@contextlib.contextmanager
def start_conductor(running: Running, flags: Sequence[str], log_path: Path) -> Iterator[str]:
    """`mooncake-vllm proxy --prefill P --decode D FLAGS` on the system's cores."""
    prefill, decode = running.servers
    conductor = ConductorProcess(["--prefill", prefill.url, "--decode", decode.url, *flags],
                                 log_path=log_path, cpus=BOTH_CORES)
    with conductor:
        running.add("conductor", conductor.process)
        try:
            conductor.wait_healthy(timeout_s=60)
            yield conductor.url
        finally:
            running.pgids.discard(conductor.process.pid or -1)


@contextlib.contextmanager
def start_system(name: str, model: str, workdir: Path, progress: Progress,
                 startup_timeout_s: float) -> Iterator[Running]:
    """Start one system; stops it all on exit."""
    with contextlib.ExitStack() as stack:
        if name in ("single", "single_1core"):
            yield _single(name, model, workdir, stack, progress, startup_timeout_s)
        elif name == "mooncake_vllm":
            yield _ours(model, workdir, stack, progress, startup_timeout_s)
        elif name == "vllm_mooncake":
            from mooncake_vllm.bench.builtin_mooncake import start_builtin_pair

            url, servers, relay = start_builtin_pair(
                model, workdir, stack, progress, startup_timeout_s, PREFILL_CORES,
                DECODE_CORES, BOTH_CORES)
            running = Running(servers, url)
            for s in servers:
                running.add(s.name, s.process)
            running.add("relay", relay)
            yield running
        else:
            raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
