"""Small helpers shared by the metadata tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from mooncake_vllm.metadata import InstanceInfo, KVLayoutRecord


def make_info(instance_id: str, role: str = "prefill", **kw: object) -> InstanceInfo:
    fields: dict[str, object] = dict(
        http_url=f"http://127.0.0.1:8000/{instance_id}",
        control_endpoint=f"tcp://127.0.0.1:9000/{instance_id}",
        model="tiny-llama",
        engine_id=f"engine-{instance_id}",
        segment_name=f"seg-{instance_id}",
        kv_layout=KVLayoutRecord(num_layers=4, block_size=32, dtype="float32", num_kv_heads=2,
                           head_size=64, tp_rank=0, tp_size=1),
        remote_control={"ranks": [f"tcp://127.0.0.1:9100/{instance_id}"]},
    )
    fields.update(kw)
    return InstanceInfo(instance_id=instance_id, role=role, **fields)  # type: ignore[arg-type]


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `pred` until true; returns the seconds it took, fails the test at the deadline."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - start


class EventLog:
    """A watch_instances callback that records (monotonic time, event, instance id)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()

    def __call__(self, event: str, info: InstanceInfo) -> None:
        with self._lock:
            self.events.append((time.monotonic(), event, info.instance_id))

    def seen(self, event: str, instance_id: str) -> float | None:
        """Monotonic time of the first such event, or None."""
        with self._lock:
            for t, ev, iid in self.events:
                if ev == event and iid == instance_id:
                    return t
        return None

    def pairs(self) -> list[tuple[str, str]]:
        with self._lock:
            return [(ev, iid) for _, ev, iid in self.events]
