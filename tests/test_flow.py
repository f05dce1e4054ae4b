"""Flow control: however large the input, at most max_queued rows of a job sit in Redis."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from conftest import cli, read_jsonl, seed_rows, write_config, write_jsonl

from opt_queue.store import keys
from opt_queue.queue.broker import _rows_of
from opt_queue.sim.api import SimServer


@contextmanager
def peak_rows(redis_url: str) -> Iterator[dict[str, int]]:
    """Watch the broker: the most rows ever waiting in the queue, and in the queue plus delivered
    but unacknowledged messages (rows, not messages: a message carries rows_per_task rows)."""
    peak = {"queued": 0, "in_redis": 0}
    done = threading.Event()

    def watch() -> None:
        probe = redis.Redis.from_url(redis_url)
        while not done.is_set():
            # one atomic read of both: a message moving from the queue to "unacked" between two
            # reads would be counted twice
            pipe = probe.pipeline(transaction=True)
            pipe.lrange(keys.QUEUE, 0, -1)
            pipe.hgetall(keys.UNACKED)
            waiting, delivered = pipe.execute()
            queued = sum(len(found[1]) for found in map(_rows_of, map(json.loads, waiting)) if found)
            unacked = sum(len(found[1]) for found in (_rows_of(json.loads(raw)[0]) for raw in delivered.values())
                          if found)
            peak["queued"] = max(peak["queued"], queued)
            peak["in_redis"] = max(peak["in_redis"], queued + unacked)
            done.wait(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        yield peak
    finally:
        done.set()
        watcher.join()


def _in_redis(redis_url: str, action: Callable[[], object]) -> dict[str, int]:
    with peak_rows(redis_url) as peak:
        action()
    return peak


def test_run_keeps_at_most_max_queued_rows_in_the_broker(tmp_path: Path, sim: SimServer, redis_url: str,
                                                          rclient: redis.Redis) -> None:
    sim.configure(latency=0.01)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(600))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, max_queued=40, concurrency=8,
                          rows_per_task=4)
    result: dict[str, object] = {}
    peak = _in_redis(redis_url, lambda: result.update(
        run=cli("run", str(data), "-c", str(config), "-o", str(out), timeout=150)))
    run = result["run"]
    assert run.returncode == 0, run.stderr  # type: ignore[attr-defined]
    assert len(read_jsonl(out)) == 600
    assert 0 < peak["queued"] <= 40, peak  # the window, never the whole file
    # plus the messages of the rows in flight: 8 rows in flight in tasks of 4, held by 4 threads
    assert peak["in_redis"] <= 40 + 4 * 4, peak

    # the control: the same watcher sees the whole file when flow control is off
    control = tmp_path / "control.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, max_queued=0, rows_per_task=4)
    peak = _in_redis(redis_url, lambda: cli("submit", str(data), "-c", str(config), "-o", str(control)))
    assert peak["queued"] == 600, peak
