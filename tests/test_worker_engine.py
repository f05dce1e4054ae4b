"""The worker side of a rows task: many rows of many tasks in flight on one event loop, capped at
the worker's concurrency; Redis losing its scripts mid-job; a row's outcome independent of its
batch neighbours."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from conftest import assert_complete, cli, seed_rows, write_config, write_jsonl

from opt_queue.core.config import Config
from opt_queue.engine.engine import Engine
from opt_queue.store.jobs import Job
from opt_queue.store.redis_conn import connect_async
from opt_queue.core.request import CHAT_URL
from opt_queue.sim.api import SimKey, SimServer

MODEL = "gpt-3.5-turbo-0613"
TEST_KEY = "sk-test-engine-0123456789abcdefghij"


@pytest.mark.slow
def test_rows_of_several_tasks_run_together_but_never_above_concurrency(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(latency=0.2)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(90))
    out = tmp_path / "output.jsonl"
    # 3 rows to a task and 7 rows in flight: a worker must draw on three tasks at once to fill its
    # cap, and must hold back the rows of tasks it has received beyond it.
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, rows_per_task=3,
                          model={"name": MODEL})
    workers(config, concurrency=7)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    assert_complete(data, out, MODEL)
    stats = sim.stats()
    assert stats["max_in_flight"] == 7
    assert stats["calls"] == 90


def _engine_config(sim: SimServer, **fields: object) -> Config:
    return Config.model_validate({"api_keys": [TEST_KEY], "api_base": sim.base_url, "limits": {"rpm": 1000},
                                  "model": {"name": MODEL}, "backoff_base": 0.01, **fields})


def _rows(n: int, start: int = 0) -> list[list[object]]:
    return [[str(i), {"model": MODEL, "messages": [{"role": "user", "content": f"row {i}"}]}]
            for i in range(start, start + n)]


def _run(redis_url: str, config: Config, job_id: str, rows: list[list[object]]) -> list[object]:
    async def go() -> list[object]:
        engine = await Engine.start(config, connect_async(redis_url, max_connections=64))
        try:
            return await engine.process_rows(job_id, rows)
        finally:
            await engine.close()
    return asyncio.run(go())


def test_rows_finish_after_redis_forgets_its_scripts(sim: SimServer, redis_url: str,
                                                      rclient: redis.Redis) -> None:
    sim.configure(keys=[SimKey(TEST_KEY)])
    config = _engine_config(sim)
    job = Job(rclient, "job-noscript")
    job.begin_submit(total=20)
    assert job.claim(str(i) for i in range(20)).claimed == [str(i) for i in range(20)]
    assert _run(redis_url, config, job.id, _rows(10)) == ["published"] * 10
    rclient.script_flush()  # as after a Redis restart: every cached script is gone
    assert _run(redis_url, config, job.id, _rows(10, start=10)) == ["published"] * 10
    assert job.unfinished() == set()
    assert job.progress().reported == 20


def test_a_row_that_fails_for_good_does_not_hold_back_its_batch(sim: SimServer, redis_url: str,
                                                                rclient: redis.Redis) -> None:
    sim.configure(keys=[SimKey(TEST_KEY)])
    config = _engine_config(sim, max_retries=0)
    job = Job(rclient, "job-mixed")
    job.begin_submit(total=4)
    job.claim(str(i) for i in range(4))
    rows = _rows(4)
    rows[2][1] = {"model": MODEL}  # no messages: the API answers 400 for this row only
    assert _run(redis_url, config, job.id, rows) == ["published"] * 4
    results = {r.index: r for r in _results(rclient, job.id)}
    assert results["2"].answer is None and results["2"].error_type
    assert all(results[i].answer for i in ("0", "1", "3"))
    # a second delivery of the same batch pays nothing and publishes nothing
    calls = sim.stats()["calls"]
    assert _run(redis_url, config, job.id, rows) == ["duplicate"] * 4
    assert sim.stats()["calls"] == calls


def _results(client: redis.Redis, job_id: str) -> list:  # type: ignore[type-arg]
    from opt_queue.store import keys
    from opt_queue.core.answers import RowResult

    return [RowResult.from_fields(fields) for _, fields in client.xrange(keys.job_results(job_id))]


def test_the_send_hook_fires_once_just_before_the_request_leaves(sim: SimServer) -> None:
    from opt_queue.providers import openai as api
    sim.configure(keys=[SimKey(TEST_KEY)], latency=1.0)
    key = _engine_config(sim).keys()[0]
    seen: list[float] = []

    async def go() -> api.Answer:
        clients = api.OpenAIProvider()
        try:
            return await clients.call(key, CHAT_URL, _rows(1)[0][1], 5.0,
                                      on_send=lambda: seen.append(time.monotonic()))
        finally:
            await clients.close()

    started = time.monotonic()
    answer = asyncio.run(go())
    answered = time.monotonic()
    assert answer.reply.text and len(seen) == 1
    # well before the 1 s the server takes to answer (the SDK client and the connection are made
    # first), not after it
    assert seen[0] - started < 0.6 and answered - seen[0] >= 0.95


def test_redis_clock_reads_redis_time_locally(rclient: redis.Redis) -> None:
    from opt_queue.limits.limiter import RedisClock

    clock = RedisClock()
    assert clock.now_ms() is None
    for _ in range(5):
        t0 = time.monotonic()
        sec, usec = rclient.time()
        clock.observe(t0, time.monotonic(), sec * 1000 + usec // 1000)
    sec, usec = rclient.time()
    assert abs(clock.now_ms() - (sec * 1000 + usec // 1000)) <= 5


@pytest.mark.slow
def test_rows_waiting_longer_than_a_task_may_be_held_go_back_to_the_queue_and_are_paid_once(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    # One 12-row task, one request per second: the last rows would hold the message for 12 s,
    # twice its 6 s visibility timeout. Rows still waiting after 2 s (a third of it) are handed
    # back instead, so the message is acknowledged in time and no row is sent twice.
    sim.configure(keys=[SimKey(TEST_KEY, rpm=1)], minute=1.0)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(12))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, api_keys=[TEST_KEY], broker_url=redis_url,
                          limits={"requests": ["1/s"]}, rows_per_task=12, visibility_timeout=6,
                          safety_margin=0.1, model={"name": MODEL})
    workers(config, concurrency=12)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out), timeout=120).returncode == 0
    assert_complete(data, out, MODEL)
    stats = sim.stats()
    assert stats["rate_limited"] == 0
    assert sorted(stats["per_prompt"].values()) == [1] * 12, stats["per_prompt"]
    assert "were enqueued again" in (tmp_path / "worker.log").read_text()


def test_azure_keys_and_extra_headers_go_through_the_sdk(sim: SimServer) -> None:
    """An Azure-style key: the deployment URL, api-version and the api-key header, as the SDK's
    AsyncAzureOpenAI sends them; a plain key's extra headers reach the server."""
    from opt_queue.providers import openai as api
    from opt_queue.core.config import Config

    azure_key, plain_key = "sk-azure-0123456789abcdefghijkl", "sk-plain-0123456789abcdefghijkl"
    sim.configure(keys=[SimKey(azure_key), SimKey(plain_key)])
    root = sim.base_url.removesuffix("/v1")
    cfg = Config.model_validate({"api_base": sim.base_url, "api_keys": [
        {"key": azure_key, "azure": {"endpoint": root, "api_version": "2024-10-21", "deployment": "gpt-4o-mini"}},
        {"key": plain_key, "headers": {"X-Project": "p-1"}}]})
    azure, plain = cfg.keys()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}

    async def go() -> list[api.Answer]:
        clients = api.OpenAIProvider()
        try:
            return [await clients.call(azure, CHAT_URL, body, 5.0), await clients.call(plain, CHAT_URL, body, 5.0)]
        finally:
            await clients.close()

    answers = asyncio.run(go())
    assert all(a.reply.text for a in answers)
    first, second = sim.received()
    assert first["_azure"] == {"deployment": "gpt-4o-mini", "api_version": "2024-10-21"}
    assert first["temperature"] == 0.2 and "_azure" not in second
    assert second["_headers"]["x-project"] == "p-1"
