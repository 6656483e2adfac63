"""A step with nothing to compute waits for the transfer instead of spinning (no vLLM engine).

The scheduler marks such a step idle; the worker then waits on the sides' news condition,
which each side notifies when it has something for vLLM's next step. Driven on real engines
with the harness of test_sides.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from mooncake_vllm.connector import messages as m
from mooncake_vllm.connector.scheduler import MooncakeScheduler
from mooncake_vllm.connector.worker import wait_for_news

from .test_sides import BS, D_ID, P_EP, Pair, _config, _make_pair


@pytest.fixture
def shared() -> Iterator[Pair]:
    """A P side and a D side on real engines; each idle wait below waits on one of them."""
    yield from _make_pair(_config(), _config())


class Waiter:
    """An idle step of one worker, in a thread: how long it waited and whether for news."""

    def __init__(self, pair: Pair, side: str, timeout_s: float) -> None:
        self.result: bool | None = None
        self.waited_s = 0.0
        news = getattr(pair, side).news
        self._thread = threading.Thread(
            target=self._run, args=(news, pair, timeout_s), daemon=True)
        self._thread.start()
        time.sleep(0.05)  # it is waiting now

    def _run(self, news: threading.Condition, pair: Pair, timeout_s: float) -> None:
        t0 = time.monotonic()
        self.result = wait_for_news(news, [pair.p, pair.d], timeout_s)
        self.waited_s = time.monotonic() - t0

    def join(self) -> None:
        self._thread.join(timeout=10)
        assert not self._thread.is_alive()


def test_idle_wait_lasts_its_cap_without_news(shared: Pair) -> None:
    shared.register("t0", "r-d", [5], BS)  # a registration out, no answer
    w = Waiter(shared, "d", 0.3)
    w.join()
    assert w.result is False and 0.25 <= w.waited_s < 2.0


def test_decode_idle_wait_ends_when_the_kv_arrives(shared: Pair) -> None:
    reg = shared.register("t1", "r-d", [5, 6], 2 * BS)
    w = Waiter(shared, "d", 30.0)
    shared.p.on_message(D_ID, reg)
    shared.prefill("t1", "r-p", [1, 2], 2 * BS)
    [(_, done)] = shared.p_replies()
    shared.d.on_message(P_EP, done)  # the control thread hands D the Done
    w.join()
    assert w.result is True and w.waited_s < 5.0
    assert shared.d.get_finished(set()) == (set(), {"r-d"})


def test_decode_idle_wait_ends_when_the_load_fails(shared: Pair) -> None:
    shared.register("t2", "r-d", [5], BS)
    w = Waiter(shared, "d", 30.0)
    shared.d.on_message(P_EP, m.Done(m.PROTOCOL_VERSION, "t2", False, "prefill failed"))
    w.join()
    assert w.result is True and w.waited_s < 5.0
    assert shared.d.take_load_errors() == {5}


def test_prefill_idle_wait_ends_when_its_blocks_are_free(shared: Pair) -> None:
    """P holds a finished request's blocks until D has its KV: the completion thread's
    Done frees them, and wakes P's idle step."""
    reg = shared.register("t3", "r-d", [5], BS)
    shared.p.on_message(D_ID, reg)
    w = Waiter(shared, "p", 30.0)
    shared.prefill("t3", "r-p", [1], BS)
    w.join()
    assert w.result is True and w.waited_s < 5.0
    assert shared.p.take_finished() == {"r-p"}


def test_scheduler_marks_steps_idle_only_while_transfers_are_awaited() -> None:
    sched = MooncakeScheduler.__new__(MooncakeScheduler)
    sched.pool = None
    sched._d_awaiting, sched._p_held, sched._pending_held, sched._d_delayed = \
        set(), set(), {}, set()
    nothing = SimpleNamespace(total_num_scheduled_tokens=0)
    busy = SimpleNamespace(total_num_scheduled_tokens=7)
    assert not sched.idle_step(nothing)  # type: ignore[arg-type]
    sched._d_awaiting.add("r")
    assert sched.idle_step(nothing)  # type: ignore[arg-type]
    assert not sched.idle_step(busy)  # type: ignore[arg-type]
    sched.update_connector_output(SimpleNamespace(  # type: ignore[arg-type]
        finished_recving={"r"}, finished_sending=None, kv_connector_worker_meta=None))
    assert not sched.idle_step(nothing)  # type: ignore[arg-type]
    sched._p_held.add("p")
    assert sched.idle_step(nothing)  # type: ignore[arg-type]
