"""Limits from the server, with real workers and the simulated API: a config with no limits runs
every key at its own real limit, follows an upgrade mid-job, pays one call for a dead key, and
works with servers that send no headers."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest import cli, read_jsonl, seed_rows, start_cli, write_config, write_jsonl

from opt_queue.core.config import fingerprint
from opt_queue.sim.api import SimKey, SimServer

SLOW, FAST = "sk-slow-xxxxxxxxxxxxxxxxxxxxxxxx", "sk-fast-xxxxxxxxxxxxxxxxxxxxxxxx"


def seed_config(path: Path, sim: SimServer, keys: list[str], **fields: object) -> Path:
    """The original toolkit's config (keys and a base URL; no limits) plus the header period of
    the simulated API's shortened minute and test-speed backoffs."""
    cfg = write_config(path, sim, api_keys=keys, **fields)
    data = json.loads(cfg.read_text())
    del data["limits"]
    cfg.write_text(json.dumps(data))
    return cfg


def test_keys_with_different_server_limits_each_run_at_their_own(tmp_path: Path, sim: SimServer,
                                                                 redis_url: str) -> None:
    """3 and 600 requests per (3 s) minute, nothing in the config: after one probe each, every key
    runs at its own limit with zero 429s, and the status says where the limits came from."""
    sim.configure(keys=[SimKey(SLOW, rpm=3), SimKey(FAST, rpm=600)], minute=3.0, latency=0.05)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(160))
    config = seed_config(tmp_path / "config.json", sim, [SLOW, FAST], broker_url=redis_url, concurrency=64)
    out = tmp_path / "output.jsonl"
    started = time.monotonic()
    result = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "2", timeout=180)
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert all(v for line in read_jsonl(out) for v in line.values()) and len(read_jsonl(out)) == 160
    stats = sim.stats()
    assert stats["rate_limited"] == 0, stats
    calls = stats["calls_per_key"]
    assert calls[fingerprint(FAST)] >= 130, calls  # the 600 key carried the job; the 3 key its share
    assert took < 60, took  # at 3 per minute (the old default) it would take 40 minutes
    snap = json.loads(cli("status", "-c", str(config), "--json").stdout)
    by_key = {k["key"]: k for k in snap["keys"]}
    for secret, limit in ((SLOW, 3), (FAST, 600)):
        (model,) = by_key[fingerprint(secret)]["models"]
        minute = next(w for w in model["windows"] if w["dim"] == "req" and w["period"] == 3.0)
        assert (minute["limit"], minute["source"]) == (limit, "learned from headers"), minute
        assert minute["read_s_ago"] is not None
    table = cli("status", "-c", str(config), env={"COLUMNS": "250"}).stdout
    assert "learned from headers" in table and "600/3s req" in table


def test_a_limit_raised_mid_job_is_used_at_once(tmp_path: Path, sim: SimServer, redis_url: str,
                                                workers) -> None:
    """An upgrade: 2 per (2 s) minute, then 300. The next response's headers carry it."""
    sim.configure(keys=[SimKey(FAST, rpm=2)], minute=2.0)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(100))
    config = seed_config(tmp_path / "config.json", sim, [FAST], broker_url=redis_url, concurrency=32)
    out = tmp_path / "output.jsonl"
    workers(config, processes=1, concurrency=32)
    proc = start_cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "0",
                     log=tmp_path / "run.log")
    time.sleep(4)
    before = sim.stats()["answered"]
    assert before <= 6, before  # 2 per 2 s
    sim.configure(keys=[SimKey(FAST, rpm=300)])
    raised = time.monotonic()
    assert proc.wait(timeout=120) == 0, (tmp_path / "run.log").read_text()[-2000:]
    assert time.monotonic() - raised < 30  # at 2 per 2 s the rest would take over 90 s
    assert len(read_jsonl(out)) == 100 and sim.stats()["rate_limited"] == 0


def test_dead_keys_cost_one_call_each_whatever_the_number_of_workers(tmp_path: Path, sim: SimServer,
                                                                     redis_url: str, workers) -> None:
    good = [SimKey(f"sk-good-{i}-xxxxxxxxxxxxxxxxxxx", rpm=100) for i in range(4)]
    dead = [SimKey("sk-revoked-xxxxxxxxxxxxxxxxxxx", dead="invalid"), SimKey("sk-spent-xxxxxxxxxxxxxxxxxxxxx", dead="quota")]
    sim.configure(keys=good + dead, minute=2.0)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(120))
    config = seed_config(tmp_path / "config.json", sim, [k.key for k in dead + good], broker_url=redis_url,
                         rows_per_task=1)
    out = tmp_path / "output.jsonl"
    workers(config, processes=3, concurrency=32)  # probes race from three processes
    result = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "0", timeout=180)
    assert result.returncode == 0, result.stderr
    assert all(v for line in read_jsonl(out) for v in line.values())
    calls = sim.stats()["calls_per_key"]
    assert [calls[fingerprint(k.key)] for k in dead] == [1, 1], calls
    assert sim.stats()["rate_limited"] == 0


def test_a_server_without_headers_teaches_its_limit_by_429s(tmp_path: Path, sim: SimServer) -> None:
    """vLLM or a proxy: no x-ratelimit headers. Every row is answered; the 429s that teach the
    limit are few, and the limit the status shows came from them."""
    sim.configure(keys=[SimKey(FAST, rpm=10)], minute=1.0, send_headers=False)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(40))
    config = seed_config(tmp_path / "config.json", sim, [FAST], concurrency=32)
    out = tmp_path / "output.jsonl"
    result = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "1", timeout=180)
    assert result.returncode == 0, result.stderr
    assert all(v for line in read_jsonl(out) for v in line.values()) and len(read_jsonl(out)) == 40
    assert sim.stats()["rate_limited"] <= 40, sim.stats()  # 32 in flight at most when it first refused


def test_slow_down_lowers_the_rate_and_every_row_is_answered(tmp_path: Path, sim: SimServer) -> None:
    sim.configure(keys=[SimKey(FAST, rpm=6000)], minute=6.0, slow_down_above=15)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(25))
    config = seed_config(tmp_path / "config.json", sim, [FAST], concurrency=64, max_retries=0)
    out = tmp_path / "output.jsonl"
    result = cli("run", str(data), "-c", str(config), "-o", str(out), "--workers", "1", timeout=180)
    assert result.returncode == 0, result.stderr
    assert all(v for line in read_jsonl(out) for v in line.values())  # no attempt used: max_retries 0
    assert sim.stats()["faults"].get("slow_down", 0) > 0
