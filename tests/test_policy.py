"""Shared limits and the error policy with real workers and the simulated API."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import TEST_KEY, cli, read_jsonl, seed_rows, write_config, write_jsonl

from opt_queue.core.config import fingerprint
from opt_queue.sim.api import SimKey, SimServer

MODEL = "gpt-3.5-turbo-0613"


def sim_keys(n: int, prefix: str = "sk-fleet", **limits: int | str | None) -> list[SimKey]:
    return [SimKey(f"{prefix}-{i:03d}-xxxxxxxxxxxxxxxx", **limits) for i in range(n)]  # type: ignore[arg-type]


@pytest.mark.slow
def test_fleet_of_three_workers_never_exceeds_any_key_limit(tmp_path: Path, sim: SimServer, redis_url: str) -> None:
    keys = sim_keys(10, rpm=6, tpm=2500)
    sim.configure(keys=keys, minute=2.0, latency=0.05, latency_jitter=0.1)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(180))
    config = write_config(tmp_path / "config.json", sim, api_keys=[k.key for k in keys], broker_url=redis_url,
                          limits={"requests": ["6/2s"], "tokens": ["2500/2s"]},
                          concurrency=8)
    out = tmp_path / "output.jsonl"

    result = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "3", timeout=150)

    assert result.returncode == 0, result.stderr
    lines = read_jsonl(out)
    assert len(lines) == 180 and all(v for line in lines for v in line.values())
    stats = sim.stats()
    assert stats["rate_limited"] == 0, f"our own traffic must never meet a 429: {stats['refusals']}"
    assert stats["answered"] == 180 and len(stats["per_key"]) == 10


def test_dead_keys_are_retired_and_the_job_finishes_on_the_others(tmp_path: Path, sim: SimServer,
                                                                 redis_url: str) -> None:
    good = sim_keys(2, "sk-good")
    keys = good + [SimKey("sk-revoked-xxxxxxxxxxxxxxxx", dead="invalid"),
                   SimKey("sk-spent-xxxxxxxxxxxxxxxxxx", dead="quota"),
                   SimKey("sk-forbidden-xxxxxxxxxxxxxx", dead="forbidden")]
    sim.configure(keys=keys)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(40))
    config = write_config(tmp_path / "config.json", sim, api_keys=[k.key for k in keys], broker_url=redis_url)
    out = tmp_path / "output.jsonl"

    result = cli("run", str(data), "-c", str(config), "-o", str(out))

    assert result.returncode == 0, result.stderr
    assert all(v for line in read_jsonl(out) for v in line.values())
    snap = json.loads(cli("status", "-c", str(config), "--json").stdout)
    retired = snap["jobs"][0]["retired_keys"]
    assert set(retired) == {fingerprint(k.key) for k in keys[2:]}
    assert "invalid_api_key" in retired[fingerprint(keys[2].key)]
    assert "insufficient_quota" in retired[fingerprint(keys[3].key)]
    assert all(k.key not in json.dumps(snap) for k in keys)
    calls = sim.stats()["calls_per_key"]  # a key is probed until it answers: a dead one costs one call
    assert all(calls[fingerprint(k.key)] == 1 for k in keys[2:]), calls


@pytest.mark.slow
def test_an_unreachable_api_base_stops_the_job_before_it_pays(tmp_path: Path, sim: SimServer) -> None:
    """Connection refused on every key's base URL: the job stops with exit 4 and one line naming
    the api_base and the error; no row is null (they stay unanswered); a key on a reachable base
    serves the job as usual. A timeout on a reachable server stays a transient error (see
    test_transient_errors_are_retried_then_null_with_the_reason)."""
    from opt_queue.jobflow.local import free_port

    dead_base = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(10))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, api_base=dead_base)

    stopped = cli("run", str(data), "-c", str(config), "-o", str(out))

    assert stopped.returncode == 4, stopped.stderr
    assert f"no api_base serving {MODEL} can be reached: {dead_base}" in stopped.stderr
    assert "Connect call failed" in stopped.stderr and "Traceback" not in stopped.stderr
    assert read_jsonl(out) == []  # unanswered, not null
    assert sim.stats()["calls"] == 0

    second = "sk-second-key-on-the-sim-xxxxxxx"
    sim.configure(keys=[SimKey(TEST_KEY), SimKey(second)])
    config = write_config(tmp_path / "config.json", sim, api_base=dead_base,
                          api_keys=[TEST_KEY, {"key": second, "api_base": sim.base_url}])
    again = cli("run", str(data), "-c", str(config), "-o", str(out))
    assert again.returncode == 0, again.stderr  # the reachable key answers every row
    assert all(v for line in read_jsonl(out) for v in line.values()) and sim.stats()["calls"] == 10


@pytest.mark.slow
def test_an_unreachable_api_base_stops_a_batch_lane_job_too(tmp_path: Path, sim: SimServer) -> None:
    """The batch lane's upload and create calls meet the refused connection: the same rule as the
    synchronous lane's retires the key and stops the job (it retried the upload for ever)."""
    from opt_queue.jobflow.local import free_port

    dead_base = f"http://127.0.0.1:{free_port()}/v1"
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(10))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, api_base=dead_base, batch_poll=0.5)

    stopped = cli("run", str(data), "-c", str(config), "-o", str(out), "--lane", "batch", timeout=120)

    assert stopped.returncode == 4, stopped.stderr
    assert f"no api_base serving {MODEL} can be reached: {dead_base}" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert read_jsonl(out) == []  # unanswered, not null
    assert sim.stats()["calls"] == 0 and not sim.stats()["batch"].get("files")


def test_all_keys_dead_stops_the_job_and_a_rerun_with_a_good_key_finishes(tmp_path: Path, sim: SimServer) -> None:
    dead = [SimKey("sk-revoked-1-xxxxxxxxxxxxxx", dead="invalid"), SimKey("sk-spent-1-xxxxxxxxxxxxxxxx", dead="quota")]
    good = SimKey("sk-fresh-key-xxxxxxxxxxxxxxx")
    sim.configure(keys=dead + [good])
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(30))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, api_keys=[k.key for k in dead])

    stopped = cli("run", str(data), "-c", str(config), "-o", str(out))

    assert stopped.returncode == 4, stopped.stderr
    assert "every key serving gpt-3.5-turbo-0613 is retired" in stopped.stderr
    assert "run the same command again" in stopped.stderr
    assert read_jsonl(out) == []  # no row was written as null: they stay unanswered for the re-run
    assert sim.stats()["answered"] == 0 and sim.stats()["calls"] == 2  # one probe per dead key
    assert "Traceback" not in stopped.stderr

    config = write_config(tmp_path / "config.json", sim, api_keys=[k.key for k in dead] + [good.key])
    again = cli("run", str(data), "-c", str(config), "-o", str(out))
    assert again.returncode == 0, again.stderr
    lines = read_jsonl(out)
    assert len(lines) == 30 and all(v for line in lines for v in line.values())


def test_server_limits_lower_than_configured_are_learned(tmp_path: Path, sim: SimServer, redis_url: str) -> None:
    keys = sim_keys(2, "sk-small", rpm=3)
    sim.configure(keys=keys, minute=1.0)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(24))
    config = write_config(tmp_path / "config.json", sim, api_keys=[k.key for k in keys], broker_url=redis_url,
                          limits={"requests": ["20/1s"]}, header_period="1s")
    out = tmp_path / "output.jsonl"

    result = cli("run", str(data), "-c", str(config), "-o", str(out), timeout=120)

    assert result.returncode == 0, result.stderr
    assert all(v for line in read_jsonl(out) for v in line.values())
    snap = json.loads(cli("status", "-c", str(config), "--json").stdout)
    minutes = [w for k in snap["keys"] for m in k["models"] for w in m["windows"]
               if w["period"] == 1.0 and w["dim"] == "req"]
    assert {(w["limit"], w["source"]) for w in minutes} == {(3, "learned from headers (below the configured 20)")}
    assert sim.stats()["rate_limited"] == 0  # the probe's answer taught the limit before any burst


def test_model_not_found_stops_the_job_early_with_the_api_message(tmp_path: Path, sim: SimServer) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(200))
    config = write_config(tmp_path / "config.json", sim, model={"name": "gpt-5-foo"}, concurrency=4)

    result = cli("run", str(data), "-c", str(config), "-o", str(tmp_path / "out.jsonl"))

    assert result.returncode == 4
    assert "The model `gpt-5-foo` does not exist" in result.stderr
    assert sim.stats()["calls"] < 50


def test_transient_errors_are_retried_then_null_with_the_reason(tmp_path: Path, sim: SimServer) -> None:
    sim.configure(transient_rate=0.3, timeout_rate=0.05, hang_seconds=3.0, reset_rate=0.05,
                  malformed_rate=0.05, empty_choices_rate=0.05, seed=3)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(60))
    config = write_config(tmp_path / "config.json", sim, request_timeout=1.0, max_retries=8)
    out = tmp_path / "output.jsonl"
    result = cli("run", str(data), "-c", str(config), "-o", str(out), timeout=150)
    assert result.returncode == 0, result.stderr
    assert all(v for line in read_jsonl(out) for v in line.values())
    assert set(sim.stats()["faults"]) >= {"transient", "timeout", "reset", "malformed", "empty_choices"}

    # that a row whose every attempt fails ends null with its reason and attempts is the error
    # policy's, tested through the fake provider in milliseconds (test_error_policy.py)


def test_a_server_error_is_retried_after_the_backoff_not_the_rate_limit_reset(tmp_path: Path,
                                                                              sim: SimServer) -> None:
    """The simulated API's 5xx carry x-ratelimit-reset-requests (about 60 s on a per-minute
    window), as the real API's do; a retry waits for the backoff (here under a second)."""
    sim.configure(keys=[SimKey(TEST_KEY, rpm=1000)], minute=60.0, transient_rate=1.0, seed=3)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(1))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, max_retries=3, backoff_base=0.1, backoff_max=1.0)
    started = time.monotonic()
    result = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "1", timeout=120)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert sim.stats()["calls"] == 4 and read_jsonl(out) == [{"0": None}]
    assert sim.stats()["faults"]["transient"] == 4
    assert took < 30, took  # four attempts; a reset hint would have made it minutes


def test_token_bound_rows_with_max_tokens_meet_no_429(tmp_path: Path, sim: SimServer) -> None:
    """The server counts prompt + max_tokens when a request arrives and gives nothing back for a
    smaller usage; pacing that settled down to usage let requests in early and met 429s."""
    sim.configure(keys=[SimKey(TEST_KEY, tpm=8000)], minute=4.0)
    # ~1,000 prompt tokens, max_tokens 1,000, answers of ~12 tokens: the server counts ~2,000 per
    # row (3 to a window); settled down to usage (~1,000) the window would seem to have room for 5
    rows = [{"index": str(i), "max_tokens": 1000,
             "messages": [{"role": "user", "content": f"{i} " + "word " * 800}]} for i in range(7)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, limits={"tokens": ["8000/4s"]}, concurrency=16)
    result = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "1", timeout=120)
    assert result.returncode == 0, result.stderr
    assert all(v for line in read_jsonl(out) for v in line.values())
    assert sim.stats()["rate_limited"] == 0 and sim.stats()["calls"] == 7
