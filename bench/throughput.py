"""Throughput and memory of the pipeline's parts on this machine (issue: speed is measured here).

Figures:
  submit     rows/s enqueued from an N-row file, and the producer's peak RSS
  broker     Redis used_memory after the submit (rows waiting in the queue)
  collect    rows/s written to output.jsonl from a results stream of N rows
  resume     seconds to compute the resume set from an N-line output.jsonl
  engine     rows/s end to end for `opt-queue run` (default settings) on a zero-latency,
             unlimited simulated API
  latency    the same with 2 s of latency per call: requests in flight (peak and sustained)

Run:  python bench/throughput.py [--rows 1000000] [--engine-rows 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from opt_queue.core.answers import RowResult
from opt_queue.jobflow.collector import Collector
from opt_queue.jobflow.dataset import read_output
from opt_queue.store.jobs import Job
from opt_queue.jobflow.local import EmbeddedRedis
from opt_queue.sim.api import SimConfig, SimKey, SimServer

KEY = "sk-bench-throughput-xxxxxxxxxxxxxxxx"


def write_input(path: Path, rows: int) -> None:
    with open(path, "w") as fh:
        for i in range(rows):
            fh.write(json.dumps({"index": str(i), "instruction": "Translate", "input": f"row number {i}"}) + "\n")


def timed_cli(d: Path, config: dict, *args: str) -> float:
    """Write ``config`` to ``d``/config.json, run ``opt-queue ARGS -c it``, return the wall time."""
    cfg = d / "config.json"
    cfg.write_text(json.dumps({"api_keys": [KEY], "log_level": "WARNING", **config}))
    os.chmod(cfg, 0o600)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "opt_queue", *args, "-c", str(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return time.monotonic() - started


def bench_submit(d: Path, server: EmbeddedRedis, rows: int) -> dict:
    # max_queued 0: unbounded, to measure the raw enqueue rate
    wall = timed_cli(d, {"broker_url": server.url, "max_queued": 0}, "submit", str(d / "data.jsonl"),
                     "-o", str(d / "out.jsonl"))
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    info = redis.Redis.from_url(server.url).info("memory")
    return {"submit_rows_per_s": round(rows / wall), "submit_wall_s": round(wall, 1),
            "submit_peak_rss_mb": round(peak_kb / 1024), "redis_used_memory_mb": round(info["used_memory"] / 2**20)}


def bench_collect(d: Path, server: EmbeddedRedis, rows: int) -> dict:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    job = Job(client, "bench-collect")
    job.begin_submit(total=rows, input=str(d / "data.jsonl"))
    job.claim(str(i) for i in range(rows))
    pipe_every = 5000
    for start in range(0, rows, pipe_every):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(rows, start + pipe_every)):
            r = RowResult(index=str(i), answer=f"answer to row {i}", attempts=1, key="key-bench")
            job._scripts.publish(client=pipe, **job._publish_call(r))
        pipe.execute()
    job.end_submit()
    out = d / "collected.jsonl"
    started = time.monotonic()
    status = Collector(client, "bench-collect", out, d / "data.jsonl").run()
    wall = time.monotonic() - started
    assert status.complete and status.answered == rows
    return {"collect_rows_per_s": round(rows / wall), "collect_wall_s": round(wall, 1)}


def bench_resume(d: Path) -> dict:
    started = time.monotonic()
    state = read_output(d / "collected.jsonl", offsets=False)  # what submit reads to skip answered rows
    return {"resume_set_s": round(time.monotonic() - started, 2), "resume_lines": len(state.answered)}


EXTRA: dict = {}
"""Config fields added to the engine and latency runs (``--set``), to compare settings."""


def bench_engine(d: Path, rows: int) -> dict:
    with SimServer(SimConfig(keys=[SimKey(KEY)])) as sim:
        write_input(d / "engine.jsonl", rows)
        wall = timed_cli(d, {"api_base": sim.base_url, "limits": {}, **EXTRA}, "run", str(d / "engine.jsonl"),
                         "-o", str(d / "engine.out.jsonl"))
        assert sim.stats()["calls"] == rows
    return {"engine_rows_per_s": round(rows / wall, 1), "engine_wall_s": round(wall, 1)}


def bench_latency(d: Path, rows: int, latency: float, concurrency: int) -> dict:
    """In flight = calls x latency / (last call - first call): the average over the active span."""
    with SimServer(SimConfig(keys=[SimKey(KEY)], latency=latency)) as sim:
        write_input(d / "latency.jsonl", rows)
        wall = timed_cli(d, {"api_base": sim.base_url, "limits": {}, "concurrency": concurrency,
                             "request_timeout": 30, **EXTRA}, "run", str(d / "latency.jsonl"),
                         "-o", str(d / "latency.out.jsonl"))
        stats = sim.stats()
    active = stats["last_call"] - stats["first_call"] + latency
    return {"latency_s": latency, "latency_concurrency_per_worker": concurrency,
            "latency_peak_in_flight": stats["max_in_flight"],
            "latency_sustained_in_flight": round(stats["calls"] * latency / active),
            "latency_rows_per_s": round(rows / wall, 1), "latency_active_rows_per_s": round(stats["calls"] / active, 1),
            "latency_wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--engine-rows", type=int, default=20_000)
    ap.add_argument("--latency", type=float, default=2.0)
    ap.add_argument("--latency-concurrency", type=int, default=1500,
                    help="rows in flight per worker process for the latency figure")
    ap.add_argument("--only", choices=["submit", "engine", "latency"], help="run one part only")
    ap.add_argument("--set", default="{}", help='config fields for the engine and latency runs, as JSON: '
                                                 '\'{"api_client": "aiohttp", "rows_per_task": 16}\'')
    args = ap.parse_args()
    EXTRA.update(json.loads(args.set))
    if EXTRA:
        print(f"# settings: {EXTRA}")
    print(f"# machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if args.only in (None, "submit"):
            write_input(d / "data.jsonl", args.rows)
            server = EmbeddedRedis(d / "redis", persist=False).start()
            try:
                results["rows"] = args.rows
                results.update(bench_submit(d, server, args.rows))
                print(json.dumps(results), flush=True)
                results.update(bench_collect(d, server, args.rows))
                results.update(bench_resume(d))
                print(json.dumps(results), flush=True)
            finally:
                server.stop()
        if args.only in (None, "engine"):
            results.update(bench_engine(d, args.engine_rows))
            print(json.dumps(results), flush=True)
        if args.only in (None, "latency"):
            results.update(bench_latency(d, args.engine_rows, args.latency, args.latency_concurrency))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
