"""The batch lane for Anthropic's Message Batches and Gemini's Batch Mode: one job's rows of three
providers through their own half-price batches, whatever is killed or expires; a batch lost in a
crash found again (by its display name, or, where the provider keeps no metadata, by its creation
time and size, its results checked against the attempt's tag)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import redis
from conftest import TEST_KEY, cli, kill_group, read_jsonl, wait_for, write_config, write_jsonl
from test_providers import ANT_KEY, CLAUDE, GEM_KEYS, GEMINI, _mixed_rows

from opt_queue.core.config import load_config
from opt_queue.core.prices import Prices
from opt_queue.jobflow.producer import submit
from opt_queue.lanes.batchlane import BatchLane, _to_wire
from opt_queue.lanes.chunks import chunk_states
from opt_queue.providers import Providers
from opt_queue.queue.app import configure
from opt_queue.sim.api import SimKey, SimServer, sim_answer
from opt_queue.store import keys
from opt_queue.store.jobs import Job
from opt_queue.store.redis_conn import connect_async

PRICES = {"gpt-4o-mini": {"input": 100.0, "output": 200.0}, CLAUDE: {"input": 1000.0, "output": 5000.0},
          GEMINI: {"input": 300.0, "output": 2500.0}}


def _config(tmp_path: Path, sim: SimServer, redis_url: str, **fields: object) -> Path:
    base = sim.base_url.removesuffix("/v1")
    fields.setdefault("model", {"name": "gpt-4o-mini", "max_tokens": 40})
    fields.setdefault("lease_seconds", 6)
    return write_config(tmp_path / "config.json", sim, broker_url=redis_url, prices=PRICES, batch_poll=0.5,
                        api_keys=[
                            TEST_KEY, {"key": ANT_KEY, "provider": "anthropic", "api_base": base},
                            {"key": GEM_KEYS[0], "provider": "gemini", "group": "proj", "api_base": base}], **fields)


@pytest.mark.slow
def test_three_providers_batches_survive_a_killed_worker_and_expiring_batches(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    # Each batch runs three quarters of its rows, then expires (each provider's way: OpenAI's error
    # file, Anthropic's "expired" results, Gemini's batch without the rows it never ran); the
    # rest go into the next batch: 20 rows a provider -> 5 -> 1, three batches each, if nothing
    # is created twice. The worker is killed while the first batches are in flight.
    sim.configure(keys=[SimKey(TEST_KEY), SimKey(ANT_KEY), SimKey(GEM_KEYS[0], org="proj")],
                  batch_delay=2.0, batch_expire_after=1.5)
    rows = _mixed_rows(60)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = _config(tmp_path, sim, redis_url, batch_attempts=10, lease_seconds=4)  # the killed worker's steps
    first = workers(config)
    submitted = cli("submit", str(data), "-c", str(config), "-o", str(out), "--lane", "batch",
                    "--output-format", "full")
    assert submitted.returncode == 0, submitted.stderr
    assert "in 3 batch files" in submitted.stdout
    wait_for(lambda: sim.stats()["batch"].get("batches", 0) == 3, timeout=30, what="a batch per provider")
    for proc in first.procs:
        kill_group(proc)  # SIGKILL while the three batches are in flight
    workers(config)
    collected = cli("collect", "-c", str(config), "-o", str(out), timeout=180)
    assert collected.returncode == 0, collected.stderr
    lines = {k: v for line in read_jsonl(out) for k, v in line.items()}
    assert sorted(lines, key=int) == [str(i) for i in range(60)]
    for row in rows:
        got, model = lines[row["index"]], row.get("model", "gpt-4o-mini")
        assert got is not None and got["text"] == sim_answer(model, row["messages"]), row["index"]
        if model == CLAUDE:
            assert got["native"]["type"] == "message" and got["finish_reason"] == "stop"
        elif model == GEMINI:
            assert "candidates" in got["native"] and got["usage"]["prompt_tokens"] > 0
    stats = sim.stats()
    assert stats["calls"] == 0  # not one synchronous call
    assert len(stats["per_prompt"]) == 60 and set(stats["per_prompt"].values()) == {1}  # each paid once
    made = [b for b in sim.api.batches.batches.values()]
    assert sorted((b.kind, len(b.lines)) for b in made) == sorted(
        (kind, n) for kind in ("anthropic", "gemini", "openai") for n in (20, 5, 1))  # none created twice
    for batch in made:  # each provider's native request, from the same rows
        for line in batch.lines:
            if batch.kind == "anthropic":
                assert line["body"]["system"] == "Answer briefly." and line["body"]["max_tokens"] == 40
            elif batch.kind == "gemini":
                assert line["body"]["systemInstruction"] == {"parts": [{"text": "Answer briefly."}]}
    job = json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)["jobs"][0]
    assert job["spend"]["calls"] == 60
    expected = sum((v["usage"]["prompt_tokens"] * PRICES[m]["input"] + v["usage"]["completion_tokens"]
                    * PRICES[m]["output"]) / 1e6 * 0.5
                   for row in rows for m, v in [(row.get("model", "gpt-4o-mini"), lines[row["index"]])])
    assert job["spend"]["cost"] == pytest.approx(expected, rel=1e-6)  # at the batch price, every provider


def _submitted_chunk(tmp_path: Path, sim: SimServer, rclient: redis.Redis, redis_url: str, model: str,  # type: ignore[no-untyped-def]
                     extra: dict | None = None):  # type: ignore[type-arg]
    config = load_config(_config(tmp_path, sim, redis_url, lane="batch", **(extra or {})))
    data = write_jsonl(tmp_path / "data.jsonl", [{"index": f"row/{i}", "model": model,
                                                  "messages": [{"role": "user", "content": f"q{i}"}]}
                                                 for i in range(5)])
    configure(redis_url)
    submit(rclient, "job-p", data, tmp_path / "out.jsonl", config)
    [(chunk_id, chunk)] = chunk_states(rclient, "job-p").items()
    key = next(k for k in config.keys() if k.serves(model) and k.provider != "openai")
    raw = rclient.get(keys.job_chunk("job-p", chunk_id)).decode()
    lines = {json.loads(line)["custom_id"]: json.loads(line) for line in raw.splitlines() if line.strip()}
    return config, key, chunk_id, chunk, lines


def _step(config, redis_url: str, chunk_id: str) -> float | None:  # type: ignore[no-untyped-def]
    async def go() -> float | None:
        client = connect_async(redis_url, max_connections=8)
        api = Providers()
        try:
            return await BatchLane(config, client, api, config.keys(), Prices()).step("job-p", chunk_id)
        finally:
            await api.close()
            await client.aclose()
    return asyncio.run(go())


def _create(key, chunk, lines, tag: str):  # type: ignore[no-untyped-def]
    """What a worker does before it dies: the batch created at the provider for an attempt."""
    async def go():  # type: ignore[no-untyped-def]
        api = Providers()
        try:
            chunk.tag = tag
            return await api.create_batch(key, chunk.url, chunk.model,
                                          {"opt_queue_job": "job-p", "opt_queue_chunk": "1", "opt_queue_tag": tag}, 30,
                                          requests=_to_wire(chunk, lines))
        finally:
            await api.close()
    return asyncio.run(go())


@pytest.mark.parametrize("model", [CLAUDE, GEMINI])
def test_a_batch_lost_in_a_crash_is_found_again_not_created_twice(
        tmp_path: Path, sim: SimServer, rclient: redis.Redis, redis_url: str, model: str) -> None:
    sim.configure(keys=[SimKey(TEST_KEY), SimKey(ANT_KEY), SimKey(GEM_KEYS[0], org="proj")], batch_delay=60.0)
    config, key, chunk_id, chunk, lines = _submitted_chunk(tmp_path, sim, rclient, redis_url, model)
    chunk.state, chunk.key, chunk.sent_at = "creating", key.fingerprint, time.time()
    created = _create(key, chunk, lines, "tag123")  # the worker dies before it records it
    # then another chunk's batch of the same size, newer, recorded by its owner: never adopted
    decoy = _create(key, chunk, lines, "decoy")
    rclient.set(keys.batch_owner(key.fingerprint, decoy.id), "other-job\n1")
    chunk.tag = "tag123"
    rclient.hset(keys.job_batches("job-p"), chunk_id, chunk.dumps())
    assert _step(config, redis_url, chunk_id) is not None
    after = chunk_states(rclient, "job-p")[chunk_id]
    assert after.state == "submitted" and after.batch_id == created.id  # adopted, not created again
    assert sim.stats()["batch"]["batches"] == 2
    sim.configure(batch_delay=0.0)
    assert _step(config, redis_url, chunk_id) is None  # done: every row published once
    assert Job(rclient, "job-p").progress().reported == 5
    assert rclient.scard(keys.job_in_batch("job-p")) == 0


def test_an_anthropic_batch_adopted_by_mistake_gives_none_of_its_answers_to_the_wrong_rows(
        tmp_path: Path, sim: SimServer, rclient: redis.Redis, redis_url: str) -> None:
    # Message Batches keep no metadata: the one unowned batch of the chunk's size created since the
    # attempt began is adopted. Here it is another attempt's (its custom ids carry another tag):
    # its results are left out and the rows are sent again, never published as this chunk's.
    sim.configure(keys=[SimKey(TEST_KEY), SimKey(ANT_KEY)], batch_delay=60.0)
    config, key, chunk_id, chunk, lines = _submitted_chunk(tmp_path, sim, rclient, redis_url, CLAUDE)
    chunk.state, chunk.key, chunk.sent_at = "creating", key.fingerprint, time.time()
    stranger = _create(key, chunk, dict(reversed(list(lines.items()))), "another")  # rows in another order
    chunk.tag = "tag123"
    rclient.hset(keys.job_batches("job-p"), chunk_id, chunk.dumps())
    _step(config, redis_url, chunk_id)
    assert chunk_states(rclient, "job-p")[chunk_id].batch_id == stranger.id
    sim.configure(batch_delay=0.0)
    assert _step(config, redis_url, chunk_id) is None
    assert Job(rclient, "job-p").progress().reported == 0  # nothing published from the wrong batch
    states = chunk_states(rclient, "job-p")
    [again] = [c for c in states.values() if c.state == "pending"]
    assert again.rows == 5 and again.attempt == 1  # the rows go into a new chunk


@pytest.mark.slow
def test_a_deadline_hands_every_providers_batch_rows_to_the_synchronous_lane_in_time(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    # each provider's batch would take a minute, and its cancel half a minute (Anthropic's batches
    # stay "canceling", Gemini's "running"): at the cut-over their rows go synchronously, the
    # answers the batches gave kept, nothing paid in both lanes
    sim.configure(keys=[SimKey(TEST_KEY), SimKey(ANT_KEY), SimKey(GEM_KEYS[0], org="proj")],
                  batch_delay=60.0, batch_cancel_delay=30.0)
    rows = _mixed_rows(30)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = _config(tmp_path, sim, redis_url)
    workers(config)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out), "--deadline", "12s").returncode == 0
    job = json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)["jobs"][0]
    assert cli("collect", "-c", str(config), "-o", str(out), timeout=180).returncode == 0
    # answered at the cut-over, not when the batches end (60 s) or their cancels do (30 s: 24 s past
    # the deadline). Measured at the simulated API's last answer, not when `collect` exits: the
    # collect command's own start-up on a loaded machine is not the deadline's business (how close
    # to the deadline the output is written is test_lanes' deadline test's)
    last_answer = sim.stats()["last_answer"] + time.time() - time.monotonic()  # (monotonic to epoch)
    assert last_answer - job["deadline_at"] < 15.0, last_answer - job["deadline_at"]
    lines = {k: v for line in read_jsonl(out) for k, v in line.items()}
    assert all(lines[r["index"]] == sim_answer(r.get("model", "gpt-4o-mini"), r["messages"]) for r in rows)
    stats = sim.stats()
    assert stats["batch"]["batches"] == 3 and stats["batch"]["cancelled"] == 3
    assert stats["batch"]["cancel_requests"] == 3  # each asked once, whatever state its provider shows
    assert len(stats["per_prompt"]) == 30 and set(stats["per_prompt"].values()) == {1}
    assert {r.get("_url") for r in sim.received()} >= {"/v1/messages", "generateContent"}  # synchronous now


def test_claude_rows_without_max_tokens_are_estimated_and_reserved_at_the_cap_anthropic_requires(
        tmp_path: Path, sim: SimServer, rclient: redis.Redis, redis_url: str) -> None:
    # Anthropic requires max_tokens: a row without one is sent with 4096, so the estimate's worst
    # case and the batch lane's budget reservation count 4096 (not the 256 a chat row is given)
    from opt_queue.jobflow.estimate import estimate

    sim.configure(keys=[SimKey(TEST_KEY), SimKey(ANT_KEY)], batch_delay=60.0)
    config, key, chunk_id, chunk, lines = _submitted_chunk(tmp_path, sim, rclient, redis_url, CLAUDE,
                                                           {"model": {"name": "gpt-4o-mini"},  # no max_tokens
                                                            "max_cost": 1000.0})
    est = estimate(tmp_path / "data.jsonl", tmp_path / "out.jsonl", config)
    assert est.models[CLAUDE].cap_tokens == 5 * 4096
    # with a budget, the batch reserves its worst case before it is created
    _step(config, redis_url, chunk_id)
    held = chunk_states(rclient, "job-p")[chunk_id]
    assert held.state == "submitted" and held.reserved_tokens == chunk.tokens + 5 * 4096
