"""Flow control: however large the input, at most max_queued rows of a job sit in Redis."""

from __future__ import annotations

import threading
from pathlib import Path

import redis
from conftest import cli, read_jsonl, seed_rows, write_config, write_jsonl

from opt_queue import keys
from opt_queue.simapi import SimServer


def test_run_keeps_at_most_max_queued_rows_in_the_broker(tmp_path: Path, sim: SimServer, redis_url: str,
                                                          rclient: redis.Redis) -> None:
    sim.configure(latency=0.01)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(600))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, max_queued=40, concurrency=8)
    peak = {"queued": 0, "in_redis": 0}
    done = threading.Event()

    def watch() -> None:
        probe = redis.Redis.from_url(redis_url)
        while not done.is_set():
            pipe = probe.pipeline(transaction=True)  # one instant
            queued, unacked = pipe.llen(keys.QUEUE).hlen("unacked").execute()
            peak["queued"] = max(peak["queued"], queued)
            peak["in_redis"] = max(peak["in_redis"], queued + unacked)
            done.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = cli("run", str(data), "-c", str(config), "-o", str(out), timeout=150)
    finally:
        done.set()
        watcher.join()
    assert result.returncode == 0, result.stderr
    assert len(read_jsonl(out)) == 600
    assert 0 < peak["queued"] <= 40, peak  # the window, never the whole file
    # plus at most one finished-but-not-yet-acknowledged message per worker thread
    assert peak["in_redis"] <= 40 + 8, peak
