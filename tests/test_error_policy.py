"""The engine's error policy through a fake provider (tests/fakes.py) on a real Redis: what each
kind of failure does to the row, the key and the job, in milliseconds and without a server."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from typing import Any

import pytest
import redis
from fakes import Call, FakeProvider, error, ok

from opt_queue.store import keys as rkeys
from opt_queue.core.answers import RowResult
from opt_queue.core.config import Config
from opt_queue.engine.engine import Engine
from opt_queue.store.jobs import Job
from opt_queue.core.prices import nano
from opt_queue.store.redis_conn import connect_async

MODEL = "gpt-4o-mini"
KEYS = [f"sk-policy-{i}-0123456789abcdefghijklmn" for i in range(3)]
_jobs = itertools.count()


def config(n_keys: int = 2, **fields: Any) -> Config:
    return Config.model_validate({"api_keys": KEYS[:n_keys], "api_base": "http://127.0.0.1:9/v1",
                                  "limits": {"rpm": 10_000}, "model": {"name": MODEL},
                                  "backoff_base": 0.01, "backoff_max": 0.05, **fields})


def fingerprints(cfg: Config) -> list[str]:
    return [k.fingerprint for k in cfg.keys()]


def run(redis_url: str, rclient: redis.Redis, cfg: Config, script: Any, rows: int = 1,
        body: dict[str, Any] | None = None, options: dict[str, Any] | None = None, **meta: Any
        ) -> tuple[FakeProvider, Job, list[Any], dict[str, RowResult]]:
    """Run ``rows`` rows of a new job (``meta``: what its submit records) through an engine on the
    fake provider; return the provider, the job, each row's outcome and the published results."""
    job = Job(rclient, f"policy-{next(_jobs)}")
    job.begin_submit(total=rows, **meta)
    job.claim(str(i) for i in range(rows))
    fake = FakeProvider(script)
    tasks = [[str(i), body or {"model": MODEL, "messages": [{"role": "user", "content": f"row {i}"}]}]
             for i in range(rows)]

    async def go() -> list[Any]:
        engine = await Engine.start(cfg, connect_async(redis_url, max_connections=16), provider=fake)
        try:
            return await engine.process_rows(job.id, tasks, options)
        finally:
            await engine.close()

    outcomes = asyncio.run(go())
    results = {r.index: r for r in (RowResult.from_fields(f) for _, f in rclient.xrange(rkeys.job_results(job.id)))}
    return fake, job, outcomes, results


def test_a_rate_limited_call_uses_no_attempt_and_the_row_goes_to_another_key(redis_url: str,
                                                                             rclient: redis.Redis) -> None:
    cfg = config(max_retries=0)  # a 429 that used an attempt would end the row null

    def script(call: Call) -> Any:
        return error(429, "rate_limit_exceeded", "Rate limit reached for requests",
                     {"retry-after-ms": "60000"}) if call.number == 1 else ok("answered")

    fake, _job, outcomes, results = run(redis_url, rclient, cfg, script)
    assert outcomes == ["published"] and results["0"].answer == "answered"
    assert results["0"].attempts == 1
    first, second = fake.calls
    assert first.key != second.key  # the refusing key cools for a minute; the other answers at once


def test_a_dead_key_is_retired_for_the_job_and_never_called_again(redis_url: str, rclient: redis.Redis) -> None:
    cfg = config()
    dead = fingerprints(cfg)[0]

    def script(call: Call) -> Any:
        return error(401, "invalid_api_key", "Incorrect API key provided") if call.key == dead else ok()

    fake, job, outcomes, results = run(redis_url, rclient, cfg, script, rows=6)
    assert outcomes == ["published"] * 6 and all(r.answer == "fine" for r in results.values())
    assert Counter(c.key for c in fake.calls)[dead] == 1
    assert dead in job.retired_keys()


def test_server_errors_are_retried_up_to_max_retries_then_the_row_is_null_with_the_reason(
        redis_url: str, rclient: redis.Redis) -> None:
    cfg = config(max_retries=2)
    fake, _job, outcomes, results = run(redis_url, rclient, cfg, lambda call: error(500, None, "boom"))
    assert outcomes == ["published"] and len(fake.calls) == 3  # the call and its two retries
    null = results["0"]
    assert null.answer is None and null.error_type == "server_error" and null.error == "boom"
    assert null.retryable and null.attempts == 3  # a re-run may send it again


def test_a_context_too_long_goes_to_the_fallback_model_once(redis_url: str, rclient: redis.Redis) -> None:
    too_long = error(400, "context_length_exceeded", "This model's maximum context length is 16385 tokens")
    cfg = config(model={"name": MODEL, "fallback": "gpt-4.1-mini"})
    fake, _job, _outcomes, results = run(
        redis_url, rclient, cfg, lambda call: too_long if call.body["model"] == MODEL else ok("long answer"),
        options={"fallback": "gpt-4.1-mini"})
    assert [c.body["model"] for c in fake.calls] == [MODEL, "gpt-4.1-mini"]
    assert results["0"].answer == "long answer" and results["0"].model == "gpt-4.1-mini"

    fake, _job, _outcomes, results = run(redis_url, rclient, config(), lambda call: too_long)
    assert len(fake.calls) == 1  # without a fallback: final, and not retried
    assert results["0"].error_type == "context_length_exceeded" and not results["0"].retryable


def test_a_bad_request_ends_the_row_null_at_once_and_its_neighbours_are_answered(
        redis_url: str, rclient: redis.Redis) -> None:
    def script(call: Call) -> Any:
        bad = call.body["messages"][0]["content"] == "row 2"
        return error(400, "invalid_value", "Invalid 'messages[0].content'") if bad else ok()

    fake, _job, outcomes, results = run(redis_url, rclient, config(max_retries=3), script, rows=4)
    assert outcomes == ["published"] * 4 and len(fake.calls) == 4
    assert results["2"].answer is None and results["2"].error_type == "invalid_value"
    assert all(results[i].answer == "fine" for i in ("0", "1", "3"))


def test_a_wrong_model_stops_the_job_before_it_calls_again(redis_url: str, rclient: redis.Redis) -> None:
    fake, job, outcomes, results = run(
        redis_url, rclient, config(concurrency=1), lambda call: error(404, "model_not_found", "The model does not exist"),
        rows=5)
    assert len(fake.calls) == 1 and results == {}  # every row stays unanswered for a re-run
    assert job.progress().status == "stopped"
    assert set(outcomes) == {"released"}


def test_an_answer_that_misses_the_schema_is_asked_again_with_what_was_wrong(redis_url: str,
                                                                            rclient: redis.Redis) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a number"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}}
    fake, _job, _outcomes, results = run(redis_url, rclient, config(schema_retries=1),
                                         lambda call: ok('{"n": "seven"}') if call.number == 1 else ok('{"n": 7}'),
                                         body=body)
    assert len(fake.calls) == 2
    asked_again = fake.calls[1].body["messages"]
    assert len(asked_again) > 1 and '{"n": "seven"}' in str(asked_again)  # the wrong answer, shown back
    assert results["0"].answer == '{"n": 7}' and results["0"].attempts == 2


def test_the_budget_stops_the_job_before_a_call_it_cannot_pay(redis_url: str, rclient: redis.Redis) -> None:
    # each row's worst case: ~400 prompt tokens and max_tokens 1,000 at $1 / $1 per million, about
    # $0.0014, and each answer costs $0.0011 (10 + 1,000 tokens): a budget of $0.003 (the job's
    # max_cost, as submit records it) pays for two rows, never a third
    cfg = config(1, concurrency=1, prices={MODEL: {"input": 1.0, "output": 1.0}})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x " * 400}], "max_tokens": 1000}
    fake, job, _outcomes, results = run(redis_url, rclient, cfg, lambda call: ok(completion_tokens=1000),
                                        rows=6, body=body, max_cost_nano=nano(0.003))
    assert len(fake.calls) == len(results) == 2
    assert job.progress().status == "stopped"


@pytest.mark.parametrize("n_keys", [1, 2])
def test_the_learned_limits_and_token_window_reach_the_limiter(redis_url: str, rclient: redis.Redis,
                                                              n_keys: int) -> None:
    """What the provider read from a response (its limits) is what the key's state then holds."""
    cfg = Config.model_validate({"api_keys": KEYS[:n_keys], "api_base": "http://127.0.0.1:9/v1",
                                 "model": {"name": MODEL}, "backoff_base": 0.01})
    _fake, _job, outcomes, _results = run(redis_url, rclient, cfg,
                                          lambda call: ok(limits={"requests": 77, "tokens": 7_700}), rows=3)
    assert outcomes == ["published"] * 3
    state = b" ".join(v for k in rclient.scan_iter("*limits*") for v in
                      (rclient.hvals(k) if rclient.type(k) == b"hash" else []))
    assert b"77" in state and b"7700" in state
