"""Guards that keep a row from being paid twice or lost on disk, each watched by a test that fails
when the guard is removed: the lease check before a call, the collector's fsync before its
acknowledgement, and one line per row before the final rewrite."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import TEST_KEY, read_jsonl, seed_rows, write_jsonl

from opt_queue.store import keys
from opt_queue.core.answers import RowResult
from opt_queue.store.leases import Leases
from opt_queue.jobflow.collector import Collector
from opt_queue.core.config import Config
from opt_queue.engine.engine import DUPLICATE, HANDED_BACK, PUBLISHED, Engine
from opt_queue.store.jobs import AsyncJob, Job
from opt_queue.store.redis_conn import connect_async
from opt_queue.sim.api import SimServer

MODEL = "gpt-3.5-turbo-0613"


def _rows(indices: list[str]) -> list[list[Any]]:
    return [[i, {"model": MODEL, "messages": [{"role": "user", "content": f"row {i}"}]}] for i in indices]


def test_a_row_whose_lease_another_live_worker_holds_is_never_sent(sim: SimServer, redis_url: str,
                                                                   rclient: redis.Redis) -> None:
    """Another worker process holds the leases of rows 0 and 1 (a redelivered copy of their task
    reached this one): this worker waits for that worker's result instead of calling the API. Row
    0's result comes (a duplicate, unpaid); row 1's does not before the task's hold runs out (it goes
    back to the queue, unpaid). Row 2, free, is sent."""
    config = Config.model_validate({"api_keys": [TEST_KEY], "api_base": sim.base_url, "limits": {"rpm": 1000},
                                    "model": {"name": MODEL}, "visibility_timeout": 6, "lease_seconds": 30})
    job_id = "leased"
    Job(rclient, job_id).begin_submit(total=3, model=MODEL)
    Job(rclient, job_id).claim(["0", "1", "2"])

    async def go() -> list[Any]:
        client = connect_async(redis_url, max_connections=32)
        other = Leases(client, 30)  # another live worker process: its own owner id
        status, codes = await other.take(AsyncJob(client, job_id), ["0", "1"])
        assert status == "running" and set(codes.values()) == {1}
        engine = await Engine.start(config, client)

        async def the_other_worker_answers_row_0() -> None:
            await asyncio.sleep(0.5)
            Job(rclient, job_id).publish(RowResult(index="0", answer="from the other worker"))
        try:
            answered = asyncio.ensure_future(the_other_worker_answers_row_0())
            outcomes = await engine.process_rows(job_id, _rows(["0", "1", "2"]))
            await answered
            return outcomes
        finally:
            await engine.close()

    outcomes = asyncio.run(go())
    assert outcomes == [DUPLICATE, HANDED_BACK, PUBLISHED]
    assert sim.stats()["calls"] == 1  # row 2 only: the leased rows never reached the API


def _published(rclient: redis.Redis, job_id: str, indices: list[str], answer: str = "answer") -> None:
    job = Job(rclient, job_id)
    job.claim(indices)
    for i in indices:
        job.publish(RowResult(index=i, answer=f"{answer} {i}"))


def test_the_collector_acknowledges_only_lines_that_are_fsynced(tmp_path: Path, redis_url: str,
                                                               rclient: redis.Redis,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A power cut after an acknowledgement must find the acknowledged lines on disk: the output
    file is fsynced after its lines are written and before the stream entries are acknowledged.
    (os.fsync is wrapped to record the order; it still syncs.)"""
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(6))
    out = tmp_path / "output.jsonl"
    job_id = "fsync"
    Job(rclient, job_id).begin_submit(total=6, model=MODEL, input=str(data), output=str(out))
    _published(rclient, job_id, [str(i) for i in range(4)])
    events: list[tuple[str, Any]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(("fsync", os.fstat(fd).st_ino))

    real_collected = Job.collected

    def collected(self: Job, entry_ids: list[Any], indices: list[str]) -> None:
        events.append(("ack", list(indices)))
        real_collected(self, entry_ids, indices)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Job, "collected", collected)
    Collector(rclient, job_id, out, data).run(drain=True)

    acks = [n for n, (kind, _what) in enumerate(events) if kind == "ack"]
    assert acks and sorted(i for n in acks for i in events[n][1]) == ["0", "1", "2", "3"]
    output_inode = out.stat().st_ino
    for n in acks:
        synced = {what for kind, what in events[:n] if kind == "fsync"}
        assert output_inode in synced, events  # the lines were fsynced before their entries were acked
        last_write_sync = max(m for m in range(n) if events[m] == ("fsync", output_inode))
        assert all(kind != "ack" for kind, _ in events[last_write_sync:n])


def test_a_row_is_written_once_before_the_final_rewrite(tmp_path: Path, redis_url: str,
                                                        rclient: redis.Redis) -> None:
    """A result read twice from the stream (an entry delivered again after a crash, a second copy of
    a row) adds no second line while the job runs: the file holds one line per row at every moment,
    not only after the rewrite in input order."""
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(4))
    out = tmp_path / "output.jsonl"
    job_id = "once"
    Job(rclient, job_id).begin_submit(total=4, model=MODEL, input=str(data), output=str(out))
    _published(rclient, job_id, ["0", "1"])
    Collector(rclient, job_id, out, data).run(drain=True)
    # the same rows' results once more in the stream, as a redelivered entry brings them
    for i in ("0", "1"):
        rclient.xadd(keys.job_results(job_id), RowResult(index=i, answer=f"again {i}").to_fields())
    _published(rclient, job_id, ["2"])
    Collector(rclient, job_id, out, data).run(drain=True)  # row 3 is missing: no final rewrite yet

    lines = [next(iter(line)) for line in read_jsonl(out)]
    assert sorted(lines) == ["0", "1", "2"], lines
    assert {k: v for line in read_jsonl(out) for k, v in line.items()}["0"] == "answer 0"


def test_entries_delivered_but_never_seen_are_read_again(redis_url: str, rclient: redis.Redis) -> None:
    """A Redis restart can lose the reply of a read after Redis recorded the delivery, and redis-py
    then runs the read again by itself: the entry is delivered to the collector and never seen. Such
    entries are read again once the stream has been quiet for a while."""
    from opt_queue.jobflow.collector import ResultStream

    stream = ResultStream(rclient, "lost-reply")
    stream.pending_every = 0.6
    seen: list[str] = []
    reads = 0

    def stop() -> bool:
        nonlocal reads
        reads += 1
        return bool(seen) or reads > 12

    gen = stream.entries(stop)
    assert next(gen) == []  # past its start (which reads what was delivered before): reading new entries
    rclient.xadd(stream.key, RowResult(index="0", answer="kept").to_fields())
    # the read whose reply was lost: delivered to "collector", seen by nobody
    rclient.xreadgroup(keys.COLLECTOR_GROUP, "collector", {stream.key: ">"}, count=10)
    for batch in gen:
        seen += [RowResult.from_fields(f).index for _id, f in batch if f]
    assert seen == ["0"]
