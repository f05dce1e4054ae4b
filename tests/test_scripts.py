"""The coalescer (``scripts.run_pipeline``) against a real Redis: the round trips that one event
loop's coroutines ask for in the same turn go out together, and each caller still gets its own
replies and only its own errors."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis
import redis.asyncio

from opt_queue.store.redis_conn import connect_async
from opt_queue.store.scripts import queue, run_pipeline, run_script, scripts_for


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_concurrent_callers_share_one_round_trip_and_keep_their_own_replies(redis_url: str) -> None:
    async def go() -> tuple[list[Any], int, int]:
        client = connect_async(redis_url, max_connections=200)

        async def one(i: int) -> list[Any]:
            def fill(pipe: Any) -> None:  # several commands a caller, in its own order
                pipe.set(f"coalesce:{i}", i)
                pipe.incrby(f"coalesce:{i}", 1000)
                pipe.get(f"coalesce:{i}")
            return await run_pipeline(client, fill)

        before = (await client.info("stats"))["total_connections_received"]
        replies = await asyncio.gather(*(one(i) for i in range(100)))
        # the 100 callers of one turn used one connection: without coalescing each caller takes
        # its own connection from the pool (100 connections, 100 round trips)
        opened = (await client.info("stats"))["total_connections_received"] - before
        in_pool = len(client.connection_pool._available_connections) + len(client.connection_pool._in_use_connections)
        await client.delete(*(f"coalesce:{i}" for i in range(100)))
        await client.aclose()
        return replies, opened, in_pool

    replies, opened, in_pool = _run(go())
    assert replies == [[True, 1000 + i, str(1000 + i).encode()] for i in range(100)]
    assert opened <= 2 and in_pool <= 2, (opened, in_pool)


def test_a_callers_error_stays_with_that_caller(redis_url: str) -> None:
    async def go() -> list[Any]:
        client = connect_async(redis_url, max_connections=8)
        await client.set("coalesce:text", "not a number")

        def bad_command(pipe: Any) -> None:
            pipe.incr("coalesce:text")  # Redis refuses: not an integer

        def bad_fill(pipe: Any) -> None:
            pipe.set("coalesce:half", 1)
            raise ValueError("a bug while filling")

        def good(pipe: Any) -> None:
            pipe.incr("coalesce:counter")

        out = await asyncio.gather(run_pipeline(client, bad_command), run_pipeline(client, bad_fill),
                                   run_pipeline(client, good), return_exceptions=True)
        # the bad fill's half-queued command was not sent
        out.append(await client.exists("coalesce:half"))
        await client.delete("coalesce:text", "coalesce:counter")
        await client.aclose()
        return out

    refused, bug, fine, half = _run(go())
    assert isinstance(refused, redis.ResponseError)
    assert isinstance(bug, ValueError)
    assert fine == [1]
    assert half == 0


def test_a_cancelled_caller_leaves_the_others_their_replies(redis_url: str) -> None:
    async def go() -> tuple[list[Any], int]:
        client = connect_async(redis_url, max_connections=8)
        victim = asyncio.ensure_future(run_pipeline(client, lambda pipe: pipe.incr("coalesce:c")))
        others = [asyncio.ensure_future(run_pipeline(client, lambda pipe: pipe.incr("coalesce:c")))
                  for _ in range(3)]
        await asyncio.sleep(0)
        victim.cancel()
        got = await asyncio.gather(*others)
        await asyncio.sleep(0.05)
        count = int(await client.get("coalesce:c"))
        await client.delete("coalesce:c")
        await client.aclose()
        return sorted(r[0] for r in got), count

    replies, count = _run(go())
    assert count in (3, 4)  # the victim's command ran once or not at all, never twice
    assert replies == list(range(count - 2, count + 1))


def test_scripts_forgotten_by_redis_are_loaded_again_and_run_once(redis_url: str, rclient: redis.Redis) -> None:
    async def go() -> list[Any]:
        client = connect_async(redis_url, max_connections=8)
        scripts = scripts_for(client)
        await run_pipeline(client, lambda pipe: pipe.zadd("coalesce:win", {"uid-1": 10}))  # loads them
        rclient.script_flush()  # as after a Redis restart
        got = await asyncio.gather(
            run_script(client, scripts.stamp, ["coalesce:win"], ["uid-1", 0, 1, 1234, 0, 1]),
            run_pipeline(client, lambda pipe: (pipe.incr("coalesce:n"),
                                               queue(pipe, scripts.stamp, ["coalesce:win"], ["uid-1", 0, 1, 1500, 0, 1]))))
        got.append(await client.zscore("coalesce:win", "uid-1"))
        got.append(await client.get("coalesce:n"))
        await client.delete("coalesce:win", "coalesce:n")
        await client.aclose()
        return got

    stamp, pair, score, counter = _run(go())
    assert stamp == 1234 and pair[1] == 1500 and score == 1500.0
    # the fill that met NOSCRIPT ran again whole: its counter counted twice (the documented cost)
    assert pair[0] in (1, 2) and int(counter) == pair[0]


def test_a_new_clients_first_round_trip_loads_the_scripts_before_its_fills_run(redis_url: str,
                                                                              rclient: redis.Redis) -> None:
    # A fill that met NOSCRIPT runs again, but what it queued after the missing script ran the first
    # time: a probe's answer was marked before its calibration (the burst went in on the estimate,
    # and met 429s). On a Redis that holds no script, a new client's first round trip loads them.
    rclient.script_flush()

    async def go() -> tuple[Any, Any]:
        client = connect_async(redis_url, max_connections=8)
        scripts = scripts_for(client)
        await client.zadd("coalesce:first", {"uid-1": 10})
        got = await run_pipeline(client, lambda pipe: (
            queue(pipe, scripts.stamp, ["coalesce:first"], ["uid-1", 0, 1, 1234, 0, 1]), pipe.incr("coalesce:after")))
        counted = await client.get("coalesce:after")
        await client.delete("coalesce:first", "coalesce:after")
        await client.aclose()
        return got, counted

    got, counted = _run(go())
    assert got == [1234, 1] and int(counted) == 1  # the fill ran once, its script first


@pytest.mark.parametrize("callers", [1, 500])
def test_many_callers_in_one_turn(redis_url: str, callers: int) -> None:
    async def go() -> list[Any]:
        client = connect_async(redis_url, max_connections=4)
        got = await asyncio.gather(*(run_pipeline(client, lambda pipe, i=i: pipe.echo(str(i)))
                                     for i in range(callers)))
        await client.aclose()
        return got

    assert _run(go()) == [[str(i).encode()] for i in range(callers)]


def test_the_identical_request_entries_are_kept_only_for_rows_in_flight(rclient: redis.Redis) -> None:
    """A job's requests hash (lua/dedupe.lua) keeps an entry only while its row can still make a
    copy: published or given-back rows' entries are pruned, so it does not grow with the job."""
    from opt_queue.core.answers import RowResult
    from opt_queue.store import jobs, keys

    job = jobs.Job(rclient, "prune")
    job.begin_submit(total=30_000)
    job._prune_at = 5_000
    requests = keys.job_requests(job.id)
    finished = 0
    for start in range(0, 30_000, 1000):
        batch = [str(i) for i in range(start, start + 1000)]
        job.claim(batch)
        assert job.dedupe((i, f"h{i}") for i in batch) == set()
        for i in batch[:900]:  # most rows finish as the next ones are claimed; a few are given back
            job.publish(RowResult(index=i, answer="a"))
        for i in batch[900:950]:
            job.release(i)
        finished += 950
        # bounded: the rows in flight plus what arrived since the last prune, never the whole job
        assert rclient.hlen(requests) <= max(2 * 5_000, jobs.PRUNE_FLOOR) + 1000
    assert job.prune_requests(step=100) == 30 * 50  # exactly the rows still in flight
    # a pruned entry no longer makes a copy; a kept one still does
    job.claim(["30000", "30001"])
    assert job.dedupe([("30000", "h0"), ("30001", "h999")]) == {"30001"}
