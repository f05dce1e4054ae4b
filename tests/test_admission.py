"""Admissions of several requests in one script call, and the worker's admission queues, on a real
Redis: in order, within every window, exact waits instead of a herd of polls, and no slot kept by
a row that stopped waiting."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import pytest
import redis
import redis.asyncio

from opt_queue.store import keys as rkeys
from opt_queue.limits.admission import Admissions
from opt_queue.limits.limiter import AsyncKeyPool, Lease, Never, Wait
from opt_queue.store.budget import Budget
from opt_queue.jobflow.local import free_port
from tests.test_limiter import T0, key


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def many(redis_url: str, keys: list, asks: list, budget_hash: dict | None = None) -> list:
    """One admission of ``asks`` at T0 (the time under the test's control)."""
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        if budget_hash:
            await client.hset("job:meta", mapping=budget_hash)
        pool = AsyncKeyPool(client, keys, margin=0.0)
        pool.now_ms = T0
        plan = pool.plan_many("m", [(tokens, budget, 0, 0) for tokens, budget in asks])
        return await pool.run_acquire(plan)
    finally:
        await client.aclose()


def test_one_call_admits_in_order_until_the_first_that_waits(redis_url: str, rclient: redis.Redis) -> None:
    a, b = key("sk-a", {"requests": ["2/10s"]}), key("sk-b", {"requests": ["2/10s"]})
    got = run(many(redis_url, [a, b], [(1, None)] * 6))
    assert [type(g) for g in got] == [Lease, Lease, Lease, Lease, Wait]  # the 6th is not looked at
    assert sorted(g.key.fingerprint for g in got[:4]) == sorted([a.fingerprint] * 2 + [b.fingerprint] * 2)
    assert len({g.uid for g in got[:4]}) == 4
    assert got[4].exact and got[4].seconds == pytest.approx(10.001, abs=0.001)
    for k in (a, b):  # each window holds its two reservations, not more
        assert rclient.zcard(rkeys.bucket_window(f"{k.bucket}/m", "req", 10.0)) == 2


def test_a_request_too_large_does_not_stop_the_ones_behind_it(redis_url: str) -> None:
    a, b = key("sk-a", {"tokens": ["100/10s"]}), key("sk-b", {"tokens": ["100/10s"]})
    got = run(many(redis_url, [a, b], [(50, None), (500, None), (50, None), (60, None), (10, None)]))
    assert [type(g) for g in got] == [Lease, Never, Lease, Wait]
    assert got[0].key.fingerprint != got[2].key.fingerprint  # the most room: the other key


def test_the_job_budget_holds_each_request_of_a_call(redis_url: str, rclient: redis.Redis) -> None:
    a = key("sk-a", {"requests": ["100/10s"]})
    share = Budget("job:meta", cost_nano=40, tokens=1)
    got = run(many(redis_url, [a], [(1, share)] * 4, {"max_cost_nano": 100}))
    assert [type(g) for g in got] == [Lease, Lease, Wait]
    assert not got[2].exact and got[2].seconds == 0.25  # requests in flight may leave room
    assert int(rclient.hget("job:meta", "reserved_nano")) == 80


class Sent:
    """Waiters that send (stamp) as soon as they are admitted, as the engine's rows do."""

    def __init__(self, pool: AsyncKeyPool) -> None:
        self.pool = pool
        self.queue = Admissions(pool, sleep=self.sleep)
        self.order: list[int] = []
        self.at: dict[str, list[float]] = defaultdict(list)
        self.slept: list[tuple[int, float]] = []  # (rows admitted so far, the wait the queue asked for)

    async def sleep(self, seconds: float) -> None:
        self.slept.append((len(self.order), seconds))
        await asyncio.sleep(seconds)

    async def row(self, i: int, timeout: float = float("inf")) -> Lease | str | None:
        got = await self.queue.wait("m", 1, set(), None, timeout)
        if isinstance(got, Lease):
            self.order.append(i)
            stamp = await self.pool.stamp(got)
            self.at[got.key.fingerprint].append(stamp / 1000)
        return got


async def queue_run(redis_url: str, n_rows: int) -> tuple[Sent, float, list[Any]]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        pool = AsyncKeyPool(client, [key("sk-q1", {"requests": ["3/1s"]}), key("sk-q2", {"requests": ["3/1s"]})])
        sent = Sent(pool)
        t0 = time.monotonic()
        tasks = []
        for i in range(n_rows):
            tasks.append(asyncio.create_task(sent.row(i)))
            await asyncio.sleep(0)  # they queue in this order
        got = await asyncio.gather(*tasks)
        return sent, time.monotonic() - t0, got
    finally:
        await client.aclose()


def test_a_queue_admits_its_rows_in_order_within_the_windows_with_few_calls(redis_url: str) -> None:
    sent, elapsed, got = run(queue_run(redis_url, 20))
    assert all(isinstance(g, Lease) for g in got)
    assert sent.order == list(range(20))  # first come, first admitted
    for stamps in sent.at.values():  # no window of 1 s holds more than 3 of a key's sends
        stamps.sort()
        assert all(later - earlier >= 1.0 for earlier, later in zip(stamps, stamps[3:]))
    # 20 rows at 6 a window need 3 more windows after the first (a bound no machine can beat); the
    # queue waits exactly until a slot frees: each wait it asks for is at most the window (the
    # oldest send's age out), never a poll's guess, and a handful of them (how long the waits
    # then take is the machine's business, not asserted)
    assert elapsed >= 3.0
    assert sent.slept and all(0 < s <= 1.0 + 0.25 for _, s in sent.slept), sent.slept
    assert len(sent.slept) <= 8, sent.slept
    # one call per slot at most, not one per waiting row per poll (rows alone made ~100 here)
    assert sent.queue.calls <= 16, sent.queue.calls


async def timeout_run(redis_url: str) -> tuple[list[Any], int, float]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        k = key("sk-t1", {"requests": ["1/1s"]})
        sent = Sent(AsyncKeyPool(client, [k]))
        first = await sent.row(0)
        gone = asyncio.create_task(sent.row(1, timeout=0.3))
        cancelled = asyncio.create_task(sent.row(2))
        await asyncio.sleep(0.1)
        cancelled.cancel()
        last = asyncio.create_task(sent.row(3))
        await asyncio.sleep(0.5)
        entries = await client.zcard(rkeys.bucket_window(f"{k.bucket}/m", "req", 1.0))
        got = [first, await gone, cancelled.cancelled(), await last]
        # the waits the queue asked for between the first admission and the last one
        return got, entries, sum(seconds for admitted, seconds in sent.slept if admitted == 1)
    finally:
        await client.aclose()


def test_a_row_that_stops_waiting_keeps_no_slot(redis_url: str) -> None:
    (first, gone, cancelled, last), entries, waited = run(timeout_run(redis_url))
    assert isinstance(first, Lease) and gone is None and cancelled and isinstance(last, Lease)
    assert entries == 1  # the first's: nothing reserved for the two that left
    # the last took the second slot (one window's wait: 1 s), not a third one (three windows')
    assert 0.5 < waited <= 1.25, waited


async def redis_down_run(url: str) -> Any:
    client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=1)
    try:
        queue = Admissions(AsyncKeyPool(client, [key("sk-d1", {"requests": ["1/1s"]})]))
        return await asyncio.gather(queue.wait("m", 1, set(), None, 10), queue.wait("m", 1, set(), None, 10),
                                    return_exceptions=True)
    finally:
        await client.aclose()


def test_a_redis_error_reaches_every_waiting_row() -> None:
    got = run(redis_down_run(f"redis://127.0.0.1:{free_port()}/0"))
    assert all(isinstance(g, redis.ConnectionError) for g in got), got


async def wanted_run(redis_url: str) -> tuple[Any, float, list[int]]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        pool = AsyncKeyPool(client, [key("sk-w1", {"requests": ["1/1s"]})])
        queue = Admissions(pool)
        first = await queue.wait("m", 1, set(), None, 5)
        await pool.stamp(first)  # sent
        t0 = time.monotonic()
        stopped_at = t0 + 0.3
        order: list[int] = []

        async def still() -> bool:
            return True

        async def stop_soon() -> bool:
            return time.monotonic() < stopped_at

        async def row(i: int, wanted: Any) -> Any:
            got = await queue.wait("m", 1, set(), None, 60, wanted, every=0.1)
            if isinstance(got, Lease):
                order.append(i)
                await pool.stamp(got)
            return got

        left = asyncio.create_task(row(0, stop_soon))
        await asyncio.sleep(0)
        kept = asyncio.create_task(row(1, still))  # checked ten times a second, never unwanted
        await asyncio.sleep(0)
        later = asyncio.create_task(row(2, still))
        gone = await left
        gone_after = time.monotonic() - t0
        await asyncio.gather(kept, later)
        return gone, gone_after, order
    finally:
        await client.aclose()


def test_a_row_leaves_when_no_longer_wanted_and_keeps_its_place_while_it_is(redis_url: str) -> None:
    gone, gone_after, order = run(wanted_run(redis_url))
    # it left at a check (None: unwanted, not its 60 s timeout, nor a slot); its slot went to row 1
    assert gone is None and gone_after < 30
    assert order == [1, 2]  # the checks did not send row 1 behind row 2; row 0 took no slot
