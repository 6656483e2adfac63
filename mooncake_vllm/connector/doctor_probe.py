"""A worker's side of `mooncake-vllm doctor`: checks run from this worker towards a peer.

The doctor can reach every instance from where it runs, which says little about whether the
instances reach each other. So it asks each worker (a `Check` on the control channel, sealed
with the cluster token like every frame) to check its peer from its own side: ping the peer's
control endpoint (reachable from here, the same cluster token, the peer healthy), and, for
the direction KV flows (prefill to decode), write into the peer's scratch region through the
engine and time it. The scratch region is a small buffer each worker registers for this
alone: a check never touches KV memory.

A check runs on a thread of its own (it blocks on the network), one at a time per worker: a
second Check while one runs is answered at once with a refusal. Every failure is answered as
a `Checked` that says what failed; nothing here raises into the channel thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from mooncake_vllm.channel.control_channel import NoAnswer, Refused
from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.control import ping

logger = logging.getLogger("vllm.mooncake_vllm.connector")

SCRATCH_BYTES = 4 << 20
LATENCY_BYTES = 4096
LATENCY_TRIES = 5
BANDWIDTH_ROUNDS = 3
PING_TIMEOUT_S = 3.0

Send = Callable[[bytes | str, m.Message], None]


class DoctorProbe:
    """Owns the scratch region (registered with `engine`) and answers Checks."""

    def __init__(self, engine: Any, token: str | None, send: Send) -> None:
        self.engine, self.token, self.send = engine, token, send
        self.scratch = np.zeros(SCRATCH_BYTES, np.uint8)
        engine.register(self.scratch.ctypes.data, self.scratch.nbytes)
        self._busy = threading.Lock()

    def pong_fields(self) -> dict[str, Any]:
        return {"segment": dict(self.engine.descriptor()),
                "scratch": (self.scratch.ctypes.data, self.scratch.nbytes)}

    def on_check(self, sender: bytes, check: m.Check) -> None:
        if not self._busy.acquire(blocking=False):
            self.send(sender, m.Checked(m.PROTOCOL_VERSION, check.transfer_id, False,
                                        "another doctor check is running on this worker"))
            return
        threading.Thread(target=self._run, args=(sender, check), name="mooncake-doctor",
                         daemon=True).start()

    def _run(self, sender: bytes, check: m.Check) -> None:
        try:
            answer = self.check(check)
        except Exception as e:  # the thread's boundary: any failure is the check's answer
            logger.exception("doctor check of %s failed", check.peer)
            answer = m.Checked(m.PROTOCOL_VERSION, check.transfer_id, False,
                               f"the check itself failed: {e}"[:4000])
        finally:
            self._busy.release()
        self.send(sender, answer)

    def check(self, check: m.Check) -> m.Checked:
        def failed(why: str, protocol: str = "") -> m.Checked:
            return m.Checked(m.PROTOCOL_VERSION, check.transfer_id, False, why[:4000], protocol)

        try:
            pong = ping(check.peer, self.token, PING_TIMEOUT_S)
        except Refused as e:
            return failed(f"{e} (from this worker)")
        except NoAnswer as e:
            return failed(f"{e} (from this worker: is the port open to it?)")
        if not pong.healthy:
            return failed(f"the peer is not healthy: {pong.reason}")
        if not check.write:
            return m.Checked(m.PROTOCOL_VERSION, check.transfer_id, True)
        if pong.segment is None or pong.scratch is None:
            return failed("the peer published no scratch region (an older version?)")
        protocol = str(pong.segment.get("protocol", ""))[:16]
        why = _segment_problem(pong.segment, check.peer)
        if why is not None:
            return failed(why, protocol)
        addr, size = pong.scratch
        try:
            seg = self.engine.open_segment(pong.segment)
        except Exception as e:
            return failed(f"cannot open the peer's engine segment "
                          f"{pong.segment.get('endpoint')!r}: {e}", protocol)
        local = self.scratch.ctypes.data
        n = min(size, self.scratch.nbytes)
        try:
            latency = min(self._write(seg, local, addr, LATENCY_BYTES)
                          for _ in range(LATENCY_TRIES))
            seconds = sum(self._write(seg, local, addr, n) for _ in range(BANDWIDTH_ROUNDS))
        except Exception as e:
            return failed(f"a test write into the peer's scratch region failed: {e}", protocol)
        return m.Checked(m.PROTOCOL_VERSION, check.transfer_id, True, "", protocol, latency,
                         n * BANDWIDTH_ROUNDS, seconds)

    def _write(self, seg: int, local: int, remote: int, n: int) -> float:
        t0 = time.perf_counter()
        self.engine.transfer_sync(seg, "write", np.array([local], np.uint64),
                                  np.array([remote], np.uint64), np.array([n], np.uint64))
        return time.perf_counter() - t0


def _segment_problem(segment: dict, control: str) -> str | None:
    """A segment a Pong names must be the engine of the worker that answered: named by its
    own endpoint (so it cannot stand in for another peer's segment here), on the host whose
    control endpoint answered."""
    endpoint = segment.get("endpoint")
    if not isinstance(endpoint, str) or segment.get("name") != endpoint:
        return f"the peer's segment is not named by its endpoint: {segment.get('name')!r:.80}"
    host = control.removeprefix("tcp://").rsplit(":", 1)[0]
    if endpoint.rsplit(":", 1)[0] != host:
        return (f"the peer's engine {endpoint!r:.80} is not on the host of its control "
                f"endpoint {control!r:.80}")
    return None
