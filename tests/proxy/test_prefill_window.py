"""PrefillWindow on a real event loop: first come first served, oversize alone, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from mooncake_vllm.proxy.prefill_window import PrefillWindow
from mooncake_vllm.proxy.upstreams import Instance, PrefillTicket


async def _admitted_order(window: PrefillWindow, sizes: list[int], limit: int,
                          order: list[int]) -> list[asyncio.Task[None]]:
    async def one(i: int, n: int) -> None:
        await window.acquire(n, limit)
        order.append(i)

    tasks = [asyncio.create_task(one(i, n)) for i, n in enumerate(sizes)]
    await asyncio.sleep(0)
    return tasks


def test_burst_is_admitted_in_arrival_order_within_the_limit() -> None:
    async def go() -> None:
        w, order = PrefillWindow(), []
        tasks = await _admitted_order(w, [300, 300, 300, 100, 300], 600, order)
        assert order == [0, 1] and w.in_flight == 600 and w.waiting == 3
        w.release(300)
        await asyncio.sleep(0)
        # 300 fits again; the small request behind it does not jump the queue.
        assert order == [0, 1, 2] and w.in_flight == 600 and w.waiting == 2
        w.release(300)
        await asyncio.sleep(0)
        assert order == [0, 1, 2, 3] and w.in_flight == 400 and w.waiting == 1
        for _ in range(2):
            w.release(300)
        await asyncio.sleep(0)
        assert order == [0, 1, 2, 3, 4] and w.waiting == 0
        assert w.waited == 3  # counted for operators (and tests) that cannot sample a wait
        await asyncio.gather(*tasks)

    asyncio.run(go())


def test_request_larger_than_the_window_goes_alone() -> None:
    async def go() -> None:
        w, order = PrefillWindow(), []
        tasks = await _admitted_order(w, [100, 1000, 100], 500, order)
        assert order == [0] and w.waiting == 2
        w.release(100)
        await asyncio.sleep(0)
        assert order == [0, 1] and w.in_flight == 1000  # alone: nothing else was in flight
        w.release(1000)
        await asyncio.sleep(0)
        assert order == [0, 1, 2]
        await asyncio.gather(*tasks)

    asyncio.run(go())


def test_cancelled_waiter_leaves_the_queue_and_takes_nothing() -> None:
    async def go() -> None:
        w, order = PrefillWindow(), []
        tasks = await _admitted_order(w, [400, 400, 100], 500, order)
        assert order == [0] and w.waiting == 2
        tasks[1].cancel()  # the client of the second request went away while it waited
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == [0, 2] and w.in_flight == 500 and w.waiting == 0
        w.release(400)
        w.release(100)
        assert w.in_flight == 0
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]

    asyncio.run(go())


def test_window_off_admits_everything_at_once() -> None:
    async def go() -> None:
        w, order = PrefillWindow(), []
        await _admitted_order(w, [5000, 5000, 5000], 0, order)
        assert order == [0, 1, 2] and w.waiting == 0

    asyncio.run(go())


def test_ticket_releases_its_window_share_exactly_once() -> None:
    async def go() -> None:
        inst = Instance("p0", "http://127.0.0.1:1", "prefill", "static")
        a, b = PrefillTicket(inst, 400), PrefillTicket(inst, 400)
        assert inst.queued_prefill_tokens == 800  # a waiting request is queued work too
        await a.enter_window(500)
        waiter = asyncio.create_task(b.enter_window(500))
        await asyncio.sleep(0)
        assert not waiter.done() and inst.window.waiting == 1
        a.close()
        a.close()
        await asyncio.wait_for(waiter, 1)
        assert inst.window.in_flight == 400 and inst.queued_prefill_tokens == 400
        b.close()
        assert inst.window.in_flight == 0 and inst.queued_prefill_tokens == 0

    asyncio.run(go())
