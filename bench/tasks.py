"""Celery's own ceiling against opt-queue's rows/s, in one run, one worker process each.

Figures (each: N messages queued first, then one worker process started; the rate is taken
while the work runs, from the first task (or API request) to the last, so start-up is left out):
  noop       a no-op Celery task with opt-queue's settings (Redis transport, late acks,
             prefetch 1, threads pool of opt-queue's size): Celery's own ceiling here
  rows       opt-queue, one task per row (the default), through the openai SDK
  rows16     opt-queue, 16 rows per task, through the SDK
  aiohttp16  opt-queue, 16 rows per task, direct aiohttp calls
The simulated API answers at once with no limit, in this process (it takes CPU too: the noop
figure does not pay for it, so the ratio is a lower bound of what the engine keeps).

Run:  python bench/tasks.py [--rows 5000] [--only noop,rows,rows16,aiohttp16] [--set JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from opt_queue import keys
from opt_queue.local import EmbeddedRedis
from opt_queue.simapi import SimConfig, SimKey, SimServer

KEY = "sk-bench-tasks-xxxxxxxxxxxxxxxxxxxxxxxx"
NOOP_APP = '''
import os
from celery import Celery
from opt_queue.app import app as real, transport_options

app = Celery("noop")
app.conf.update({k: v for k, v in real.conf.items() if k.startswith(("task_", "worker_", "broker_"))
                 and k not in ("broker_url",)})
app.conf.broker_url = os.environ["OPT_QUEUE_BROKER_URL"]
app.conf.broker_transport_options = transport_options(3600)
app.conf.task_default_queue = "noop"


@app.task(name="noop", acks_late=True, ignore_result=True)
def noop(job, rows, options=None):
    return None
'''


def wait_drained(client: redis.Redis, queue: str, total: int, timeout: float = 900) -> tuple[float, float]:
    """Poll until ``queue`` and kombu's unacked hash are empty; return (first taken, all done)."""
    first = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left, unacked = client.llen(queue), client.hlen(keys.UNACKED)
        now = time.monotonic()
        if first is None and left < total:
            first = now
        if first is not None and left == 0 and unacked == 0:
            return first, now
        time.sleep(0.005)
    raise SystemExit(f"{queue} did not drain in {timeout}s")


def bench_noop(d: Path, url: str, rows: int, threads: int) -> float:
    (d / "noop_app.py").write_text(NOOP_APP)
    env = dict(os.environ, OPT_QUEUE_BROKER_URL=url, PYTHONPATH=f"{d}:{os.environ.get('PYTHONPATH', '')}")
    client = redis.Redis.from_url(url)
    client.flushall()
    os.environ["OPT_QUEUE_BROKER_URL"] = url
    sys.path.insert(0, str(d))
    import noop_app  # type: ignore[import-not-found]

    with noop_app.app.producer_or_acquire() as producer:
        for i in range(rows):
            noop_app.app.send_task("noop", args=("bench", [[str(i), {}]], {}), queue="noop", producer=producer)
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "noop_app", "worker", "--pool", "threads",
                               "--concurrency", str(threads), "-Q", "noop", "--loglevel", "WARNING",
                               "--without-mingle", "--without-gossip"], env=env, cwd=d,
                              stdout=subprocess.DEVNULL, stderr=open(d / "noop.log", "wb"))
    try:
        first, last = wait_drained(client, "noop", rows)
    finally:
        worker.terminate()
        worker.wait(30)
    return rows / (last - first)


def bench_rows(d: Path, url: str, rows: int, settings: dict) -> float:
    client = redis.Redis.from_url(url)
    client.flushall()
    with SimServer(SimConfig(keys=[SimKey(KEY)])) as sim:
        config = d / "config.json"
        config.write_text(json.dumps({"api_keys": [KEY], "api_base": sim.base_url, "broker_url": url,
                                      "log_level": "WARNING", "max_queued": 0, **settings}))
        os.chmod(config, 0o600)
        data = d / "data.jsonl"
        with open(data, "w") as fh:
            for i in range(rows):
                fh.write(json.dumps({"index": str(i), "instruction": "Translate", "input": f"row {i}"}) + "\n")
        out = d / f"out-{time.monotonic_ns()}.jsonl"
        subprocess.run([sys.executable, "-m", "opt_queue", "submit", str(data), "-c", str(config), "-o", str(out)],
                       check=True, capture_output=True)
        worker = subprocess.Popen([sys.executable, "-m", "opt_queue", "worker", "-c", str(config), "--no-events"],
                                  stdout=subprocess.DEVNULL, stderr=open(d / "worker.log", "ab"))
        try:
            wait_drained(client, keys.QUEUE, rows)
        finally:
            worker.terminate()
            worker.wait(60)
        stats = sim.stats()
        assert stats["answered"] == rows, stats
    return rows / (stats["last_answer"] - stats["first_call"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--only", default="noop,rows,rows16,aiohttp16")
    ap.add_argument("--set", default="{}", help="config fields added to every opt-queue run, as JSON")
    args = ap.parse_args()
    extra = json.loads(args.set)
    print(f"# machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}"
          + (f"; settings {extra}" if extra else ""))
    cases = {"rows": {}, "rows16": {"rows_per_task": 16}, "aiohttp16": {"rows_per_task": 16, "api_client": "aiohttp"}}
    results: dict = {"rows": args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        server = EmbeddedRedis(d / "redis", persist=False).start()
        try:
            for part in args.only.split(","):
                if part == "noop":
                    # the pool opt-queue gives a worker of the default concurrency and one row a task
                    results["noop_tasks_per_s"] = round(bench_noop(d, server.url, args.rows, 512), 1)
                else:
                    results[f"{part}_rows_per_s"] = round(bench_rows(d, server.url, args.rows,
                                                                     {**cases[part], **extra}), 1)
                print(json.dumps(results), flush=True)
        finally:
            server.stop()
    if "noop_tasks_per_s" in results and "rows_rows_per_s" in results:
        results["ratio_rows_to_noop"] = round(results["rows_rows_per_s"] / results["noop_tasks_per_s"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
