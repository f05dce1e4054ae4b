"""The batch lane's pieces: how rows are cut into Batch API files, and the step that must never
create a second batch for the same rows after a crash."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import redis
from conftest import TEST_KEY, write_config, write_jsonl

from opt_queue.store import keys
from opt_queue.queue.app import configure
from opt_queue.lanes.batchlane import PUBLISH_GROUP, BatchLane
from opt_queue.lanes.chunks import HANDOFF_SECONDS, Chunk, ChunkWriter, chunk_states, cutover_at
from opt_queue.providers import Providers
from opt_queue.core.config import load_config
from opt_queue.store.jobs import AsyncJob, Job
from opt_queue.core.prices import Prices
from opt_queue.jobflow.producer import submit
from opt_queue.store.redis_conn import connect_async
from opt_queue.sim.api import SimServer


def chat(i: int, text: str = "hello", model: str = "gpt-4o-mini") -> dict:  # type: ignore[type-arg]
    return {"model": model, "messages": [{"role": "user", "content": f"{text} {i}"}]}


def test_rows_are_cut_into_files_by_lines_bytes_tokens_and_model(tmp_path: Path, sim: SimServer,
                                                                 rclient: redis.Redis) -> None:
    config = load_config(write_config(tmp_path / "c.json", sim, batch_max_lines=3, batch_max_bytes=2000,
                                      batch_token_limit=60))
    writer = ChunkWriter(rclient, "job-a", config, {})
    for i in range(7):
        writer.add(str(i), chat(i), "/v1/chat/completions")  # 3 + 3 + 1 by lines
    writer.add("e1", {"model": "text-embedding-3-small", "input": "x"}, "/v1/embeddings")  # its own file
    writer.add("long", chat(0, "word " * 60), "/v1/chat/completions")  # tokens: a file of its own
    writer.flush()
    states = chunk_states(rclient, "job-a")
    sizes = sorted((c.url, c.model, c.rows) for c in states.values())
    assert sizes == [("/v1/chat/completions", "gpt-4o-mini", 1), ("/v1/chat/completions", "gpt-4o-mini", 1),
                     ("/v1/chat/completions", "gpt-4o-mini", 3), ("/v1/chat/completions", "gpt-4o-mini", 3),
                     ("/v1/embeddings", "text-embedding-3-small", 1)]
    for chunk_id, chunk in states.items():
        data = rclient.get(keys.job_chunk("job-a", chunk_id)).decode()
        lines = [json.loads(line) for line in data.splitlines()]
        assert len(lines) == chunk.rows and len(data.encode()) <= 2000
        assert all(line["url"] == chunk.url and line["method"] == "POST" for line in lines)
    assert rclient.scard(keys.job_in_batch("job-a")) == 9
    assert rclient.zcard(keys.BATCH_DUE) == 5


def test_a_crash_between_creating_a_batch_and_recording_it_creates_no_second_batch(
        tmp_path: Path, sim: SimServer, rclient: redis.Redis, redis_url: str) -> None:
    config = load_config(write_config(tmp_path / "c.json", sim, broker_url=redis_url, lane="batch",
                                      model={"name": "gpt-4o-mini", "max_tokens": 10}))
    data = write_jsonl(tmp_path / "data.jsonl", [{"index": str(i), "messages": [{"role": "user", "content": f"q{i}"}]}
                                                 for i in range(5)])
    configure(redis_url)
    submit(rclient, "job-b", data, tmp_path / "out.jsonl", config)
    [(chunk_id, chunk)] = chunk_states(rclient, "job-b").items()
    # What a worker does before it dies: the state says "creating", then the batch is created at
    # the provider with the attempt's tag, and the worker is gone before it records the batch.
    chunk.state, chunk.key, chunk.tag = "creating", config.keys()[0].fingerprint, "tag123"
    rclient.hset(keys.job_batches("job-b"), chunk_id, chunk.dumps())
    provider = openai.OpenAI(api_key=TEST_KEY, base_url=sim.base_url, max_retries=0)
    uploaded = provider.files.create(file=("f.jsonl", rclient.get(keys.job_chunk("job-b", chunk_id))),
                                     purpose="batch")
    created = provider.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h",
                                      metadata={"opt_queue_job": "job-b", "opt_queue_chunk": chunk_id,
                                                "opt_queue_tag": "tag123"})

    async def next_step() -> float | None:
        client = connect_async(redis_url, max_connections=8)
        api = Providers()
        lane = BatchLane(config, client, api, config.keys(), Prices())
        try:
            return await lane.step("job-b", chunk_id)
        finally:
            await api.close()
            await client.aclose()

    assert asyncio.run(next_step()) is not None
    after = chunk_states(rclient, "job-b")[chunk_id]
    assert after.state == "submitted" and after.batch_id == created.id  # adopted, not created again
    assert sim.stats()["batch"]["batches"] == 1
    sim.configure(batch_delay=0.0)
    assert asyncio.run(next_step()) is None  # done: every row published once
    assert Job(rclient, "job-b").progress().reported == 5
    assert rclient.scard(keys.job_in_batch("job-b")) == 0
    assert isinstance(Chunk.loads(rclient.hget(keys.job_batches("job-b"), chunk_id)), Chunk)


def test_a_step_is_due_again_when_its_lease_renewer_outlives_its_cancel(
        tmp_path: Path, sim: SimServer, rclient: redis.Redis, redis_url: str) -> None:
    """A step's lease is renewed while it runs; once it ends, its next step is set and the renewer
    must be gone. On Python 3.11 one cancel() of a task writing to Redis can be swallowed (redis-py
    writes through asyncio.wait_for: ~1 in 60 in a loop of ZADDs), and the renewer went on moving
    the step a lease ahead for ever: the batch was never polled again. The renewer here swallows
    its first cancel as that does."""
    config = load_config(write_config(tmp_path / "c.json", sim, broker_url=redis_url, lane="batch",
                                      lease_seconds=2))
    member = "job-r\n1"
    rclient.zadd(keys.BATCH_DUE, {member: 0})

    class Lane(BatchLane):
        async def step(self, job_id: str, chunk_id: str) -> float | None:
            await asyncio.sleep(0.8)  # the lease is renewed once (every 0.5 s)
            return 0.0  # due again at once

        async def _keep(self, member: str) -> None:
            try:
                await super()._keep(member)
            except asyncio.CancelledError:  # swallowed: it goes on
                await super()._keep(member)

    async def run_step() -> tuple[float, float, bool]:
        client = connect_async(redis_url, max_connections=8)
        lane = Lane(config, client, Providers(), config.keys(), Prices())
        try:
            await lane._run(member)
            await asyncio.sleep(1.5)  # three renewal periods
            seconds, micros = await client.time()
            leftover = [t for t in asyncio.all_tasks() if "_keep" in repr(t.get_coro())]
            return seconds * 1000 + micros / 1000, await client.zscore(keys.BATCH_DUE, member), bool(leftover)
        finally:
            await client.aclose()

    now, due, renewing = asyncio.run(run_step())
    assert due <= now and not renewing, f"the step is due {due - now:.0f} ms from now; renewer alive: {renewing}"


def test_the_cut_over_leaves_a_quarter_of_the_time_or_what_the_limits_need() -> None:
    # and, on top, the hand-off's own time (the batches' cancel, their answers read, the workers'
    # first look at the rows)
    assert cutover_at(100.0, 1000.0) == 1075.0 - HANDOFF_SECONDS  # limits unknown: the last quarter
    assert cutover_at(100.0, 1000.0, sync_seconds=40.0) == 1050.0 - HANDOFF_SECONDS  # 40 s and a quarter more
    assert cutover_at(100.0, 1000.0, sync_seconds=10.0) == 1075.0 - HANDOFF_SECONDS  # never less than a quarter
    assert cutover_at(100.0, 1000.0, sync_seconds=500.0) == 1000.0  # no time for a batch: synchronous now


def test_a_finished_batch_is_published_as_its_results_stream_in(
        tmp_path: Path, sim: SimServer, rclient: redis.Redis, redis_url: str) -> None:
    """A worker publishes a finished batch's rows a group at a time while its results download:
    it never holds every result of the batch (the whole output file parsed cost ~9 kB a row, so a
    50,000-row batch ~450 MB). The results here come from a stream that checks, as each one is
    taken, that the rows of all but the last group taken are published already."""
    rows = 1600
    config = load_config(write_config(tmp_path / "c.json", sim, broker_url=redis_url, lane="batch",
                                      model={"name": "gpt-4o-mini", "max_tokens": 10}))
    data = write_jsonl(tmp_path / "data.jsonl", [{"index": str(i), "messages": [{"role": "user", "content": f"q{i}"}]}
                                                 for i in range(rows)])
    configure(redis_url)
    submit(rclient, "job-s", data, tmp_path / "out.jsonl", config)
    [(chunk_id, chunk)] = chunk_states(rclient, "job-s").items()
    chunk.state, chunk.key, chunk.batch_id = "submitted", config.keys()[0].fingerprint, "batch_x"
    behind: list[tuple[int, int]] = []

    async def finish() -> None:
        client = connect_async(redis_url, max_connections=8)
        api = Providers()
        lane = BatchLane(config, client, api, config.keys(), Prices())
        job = AsyncJob(client, "job-s")

        async def results() -> AsyncIterator[dict]:  # type: ignore[type-arg]
            for taken, index in enumerate(lines):
                published = int(await client.hget(keys.job_meta("job-s"), "reported") or 0)
                if published < taken - PUBLISH_GROUP:
                    behind.append((taken, published))
                body = {"id": f"c{index}", "object": "chat.completion", "model": "gpt-4o-mini",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"a{index}"},
                                     "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}
                yield {"custom_id": index, "error": None, "response": {"status_code": 200, "body": body}}

        try:
            lines = await lane._lines("job-s", chunk_id)
            await lane._finish(job, chunk_id, chunk, results(), lines, late=False)
        finally:
            await api.close()
            await client.aclose()

    asyncio.run(finish())
    assert Job(rclient, "job-s").progress().reported == rows
    assert not behind, f"results taken before their rows were published (taken, published): {behind[:3]}"
    assert rclient.scard(keys.job_in_batch("job-s")) == 0 and not rclient.exists(keys.job_chunk("job-s", chunk_id))
