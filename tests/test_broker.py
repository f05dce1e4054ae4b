"""The broker's internals: bulk task messages are what apply_async writes; a row's lease admits one
worker at a time; a dead worker's messages are put back at once; lost messages are found; a row's
state follows its index and the output file."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import redis
import redis.asyncio
from conftest import queued_rows, seed_rows, write_jsonl

from opt_queue.store import keys
from opt_queue.core.answers import RowResult
from opt_queue.queue.app import configure
from opt_queue.queue.broker import LostRows, envelope, push, recover_stale
from opt_queue.store.leases import DONE, HELD, TAKEN, Leases
from opt_queue.core.config import Config
from opt_queue.jobflow.dataset import iter_input
from opt_queue.store.jobs import AsyncJob, Job
from opt_queue.jobflow.producer import enqueue, requeue
from opt_queue.store.redis_conn import connect_async
from opt_queue.worker.tasks import rows


def shape(message: dict) -> dict:
    """A message with its per-message ids blanked out."""
    out = json.loads(json.dumps(message))
    for k in ("id", "root_id", "origin"):
        out["headers"][k] = "*"
    for k in ("correlation_id", "delivery_tag", "reply_to"):
        out["properties"][k] = "*"
    return out


def test_envelope_matches_what_apply_async_writes(redis_url: str, rclient: redis.Redis) -> None:
    configure(redis_url)
    batch = [("7", {"model": "m", "messages": [{"role": "user", "content": "é 字"}]}),
             ("row-8", {"model": "m", "messages": [{"role": "user", "content": "b"}], "temperature": 0})]
    args = ("job-1", batch, {"fallback": "f"})
    rows.apply_async(args=args, argsrepr=repr(("job-1", ["7", "row-8"])), kwargsrepr="{}",
                     shadow="rows job-1:7..row-8 (2)")
    ordinary = json.loads(rclient.rpop(keys.QUEUE))
    bulk = json.loads(envelope(*args))
    assert shape(bulk) == shape(ordinary)
    assert bulk["body"] == ordinary["body"]
    assert bulk["headers"]["argsrepr"] == "('job-1', ['7', 'row-8'])"  # what Flower shows


def test_push_keeps_first_in_first_out(rclient: redis.Redis) -> None:
    assert push(rclient, ["a", "b", "c"]) == 3
    assert [rclient.rpop(keys.QUEUE) for _ in range(3)] == [b"a", b"b", b"c"]


def _job(rclient: redis.Redis, job_id: str, indices: list[str]) -> Job:
    job = Job(rclient, job_id)
    job.begin_submit(total=len(indices))
    assert sorted(job.claim(indices).claimed) == sorted(indices)
    return job


def test_row_state_follows_the_index_and_the_file(rclient: redis.Redis) -> None:
    """Decimal and other indices alike: a claimed row is not claimed twice; a published row awaits
    collection; a collected row whose line the file lost (or turned null) is claimed again."""
    indices = ["0", "17", "007", "row-a", "16777216", "é"]
    job = _job(rclient, "job-ix", indices)
    assert job.claim(indices).busy == 6 and job.unfinished() == set(indices)
    for i in ("17", "007", "row-a"):
        assert job.publish(RowResult(index=i, answer="x"))
        assert not job.publish(RowResult(index=i, answer="again"))  # once per row
    assert job.unfinished() == {"0", "16777216", "é"}
    again = job.claim(indices)
    assert again.claimed == [] and again.busy == 3 and again.pending == 3  # not collected yet
    job.collected([], ["17", "007"])
    again = job.claim(["17", "007", "row-a"])
    assert sorted(again.claimed) == ["007", "17"] and again.redone == {"007", "17"} and again.pending == 1
    assert job.unfinished() == {"0", "16777216", "é", "17", "007"}
    assert job.progress().outstanding == 5


def test_forget_queued_keeps_results_that_await_collection(rclient: redis.Redis) -> None:
    job = _job(rclient, "job-fq", ["1", "2", "x", "y"])
    job.publish(RowResult(index="1", answer="a"))
    job.publish(RowResult(index="x", answer="b"))
    job.forget_queued()
    got = job.claim(["1", "2", "x", "y"])
    assert sorted(got.claimed) == ["2", "y"] and got.pending == 2


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_a_lease_admits_one_owner_until_it_ends_or_expires(redis_url: str, rclient: redis.Redis) -> None:
    _job(rclient, "job-lease", ["1", "k"])

    async def go() -> None:
        client = connect_async(redis_url, max_connections=4)
        job = AsyncJob(client, "job-lease")
        a, b = Leases(client, seconds=0.5), Leases(client, seconds=0.5)
        assert await a.take(job, ["1", "k"]) == ("running", {"1": TAKEN, "k": TAKEN})
        assert await b.take(job, ["1", "k"]) == ("running", {"1": HELD, "k": HELD})
        assert await a.take(job, ["1"]) == ("running", {"1": TAKEN})  # its own lease again
        await a.renew()
        await asyncio.sleep(0.3)
        await a.renew()  # renewed: still a's after more than one lease length in all
        await asyncio.sleep(0.3)
        assert await b.take(job, ["1"]) == ("running", {"1": HELD})
        await a.give_up(job, ["k"])
        assert await b.take(job, ["k"]) == ("running", {"k": TAKEN})
        await asyncio.sleep(0.6)  # a stops renewing (as if dead): b may take row 1
        assert await b.take(job, ["1"]) == ("running", {"1": TAKEN})
        await a.renew()
        assert ("job-lease", "1") in a.lost  # a learns it lost the row
        await job._scripts.publish(**job._publish_call(RowResult(index="1", answer="x")))
        assert await a.take(job, ["1"]) == ("running", {"1": DONE})
        # a row published while its owner's renewal was on its way: its lease ended, nobody
        # else holds it, so the owner is not told it lost the row (nor warns of a stall)
        assert await b.take(job, ["k"]) == ("running", {"k": TAKEN})
        await job._scripts.publish(**job._publish_call(RowResult(index="k", answer="y")))
        await b.renew()
        assert ("job-lease", "k") not in b.lost
        await job.stop("test")
        assert await a.take(job, ["k"]) == ("stopped", {})
        assert await a.take(AsyncJob(client, "job-gone"), ["1"]) == ("unknown", {})
        await client.aclose()

    _run(go())


def test_the_renewer_extends_every_held_lease_each_quarter_lease_and_outlives_a_redis_error(
        redis_url: str, rclient: redis.Redis) -> None:
    """The renew timer driven through an injected sleep: no wall-clock wait, no timing bound."""
    _job(rclient, "job-renew", ["1", "2"])

    async def go() -> None:
        client = connect_async(redis_url, max_connections=4)
        dead = redis.asyncio.Redis.from_url("redis://127.0.0.1:1/0")  # nothing listens there; no retries
        asked: list[float] = []
        ticks: asyncio.Queue[None] = asyncio.Queue()
        renewed: asyncio.Queue[None] = asyncio.Queue()

        async def sleep(seconds: float) -> None:
            if asked:
                renewed.put_nowait(None)  # the previous tick's renewal (or its failure) is over
            asked.append(seconds)
            await ticks.get()

        leases = Leases(client, seconds=8, sleep=sleep)
        job = AsyncJob(client, "job-renew")
        await leases.take(job, ["1", "2"])
        first = dict(rclient.zrange(keys.job_leases("job-renew"), 0, -1, withscores=True))
        leases.start()
        await asyncio.sleep(0)
        leases.ms = 600_000  # renewals from now on reach ten minutes ahead: visible in the scores
        leases.client = dead  # the first renewal meets a Redis that is down
        ticks.put_nowait(None)
        await renewed.get()
        assert dict(rclient.zrange(keys.job_leases("job-renew"), 0, -1, withscores=True)) == first
        leases.client = client  # Redis is back: the renewer kept going
        ticks.put_nowait(None)
        await renewed.get()
        after = dict(rclient.zrange(keys.job_leases("job-renew"), 0, -1, withscores=True))
        assert set(after) == {b"1", b"2"}
        assert all(after[i] - first[i] > 500_000 for i in after)
        assert asked[:2] == [2.0, 150.0]  # a quarter of the lease length, as it stood
        await leases.stop()
        await client.aclose()
        await dead.aclose()

    _run(go())


def _unacked(rclient: redis.Redis, tag: str, entry: str, age: float) -> None:
    rclient.hset(keys.UNACKED, tag, json.dumps([json.loads(entry), "", keys.QUEUE]))
    rclient.zadd(keys.UNACKED_INDEX, {tag: time.time() - age})


def test_recover_stale_puts_back_exactly_the_dead_workers_messages(redis_url: str, rclient: redis.Redis) -> None:
    configure(redis_url)
    _job(rclient, "job-r", [str(i) for i in range(8)])
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    _unacked(rclient, "dead", envelope("job-r", [("0", body), ("1", body)], {}), age=40)
    _unacked(rclient, "young", envelope("job-r", [("2", body)], {}), age=5)
    _unacked(rclient, "alive", envelope("job-r", [("3", body)], {}), age=40)
    _unacked(rclient, "finished", envelope("job-r", [("4", body)], {}), age=40)
    Job(rclient, "job-r").publish(RowResult(index="4", answer="done"))

    async def lease_row_3() -> None:
        client = connect_async(redis_url, max_connections=2)
        await Leases(client, seconds=60).take(AsyncJob(client, "job-r"), ["3"])
        await client.aclose()

    _run(lease_row_3())
    assert recover_stale(rclient, lease_seconds=30) == 1
    assert queued_rows(rclient) == ["0", "1"]
    assert set(rclient.hkeys(keys.UNACKED)) == {b"young", b"alive", b"finished"}
    restored = json.loads(rclient.lindex(keys.QUEUE, -1))
    assert restored["headers"]["redelivered"] is True
    Job(rclient, "job-r").stop("test")
    _unacked(rclient, "dead2", envelope("job-r", [("5", body)], {}), age=40)
    assert recover_stale(rclient, lease_seconds=30) == 0  # a stopped job's rows stay put


def test_lost_rows_are_enqueued_again_after_two_quiet_passes(tmp_path: Path, redis_url: str,
                                                               rclient: redis.Redis) -> None:
    configure(redis_url)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(10))
    config = Config.model_validate({"api_keys": ["sk-x"], "rows_per_task": 4})
    enqueue(rclient, "job-q", iter_input(data), 10, config)
    assert rclient.llen(keys.QUEUE) == 3  # rows 0-3, 4-7, 8-9
    rclient.rpop(keys.QUEUE)  # rows 0-3: lost, as if popped by a dying worker
    held = rclient.rpop(keys.QUEUE)  # rows 4-7: delivered, not acknowledged
    _unacked(rclient, "tag-1", held, age=0)
    found = []
    lost = LostRows(rclient, "job-q", lambda ix: found.append(ix) or requeue(rclient, "job-q", data, config, ix),
                    lease_seconds=0.2)
    assert lost.check("same") == 0  # the job moved (first look)
    time.sleep(0.25)
    assert lost.check("same") == 0  # suspects, not yet sure
    time.sleep(0.25)
    assert lost.check("same") == 4
    assert found == [{"0", "1", "2", "3"}]
    assert queued_rows(rclient) == ["0", "1", "2", "3", "8", "9"]
