"""Celery's own ceiling against opt-queue's rows/s, in one run, one worker process each.

Figures (each: N messages queued first, then one worker process started; the rate is taken
while the work runs, from the first task (or API request) to the last, so start-up is left out):
  noop       a no-op Celery task with opt-queue's settings (Redis transport, late acks,
             prefetch 1, threads pool of opt-queue's size): Celery's own ceiling here
  handoff    the no-op task, but it waits for a do-nothing coroutine on an event loop thread
             (opt-queue's hand-off from Celery's pool thread to the rows' loop and back)
  rows       opt-queue, one task per row (the default), through the openai SDK
  rows16     opt-queue, 16 rows per task, through the SDK
  aiohttp16  opt-queue, 16 rows per task, direct aiohttp calls
  sdk_call   the API call alone as the engine makes it through the SDK, 64 in flight on one
             event loop (no Celery, no Redis): what the SDK costs the worker per row
  aiohttp_call  the same call over aiohttp directly
  floor      a minimal client of its own, in its own process: asyncio + aiohttp, 64 rows in
             flight, one POST and one JSON parse a row, answers appended to a file (what one HTTP
             call costs on this machine; every opt-queue figure is also given as a ratio to it)
The simulated API answers at once with no limit, in this process (it takes CPU too: the noop
figure does not pay for it, so the ratio is a lower bound of what the engine keeps).

Each figure also gives the worker process's CPU time per task (user + system, between the same
two moments): on a shared machine it moves less than the rates do; and the Redis round trips per
task (the server's count of reads), which do not move at all.

Run:  python bench/tasks.py [--rows 5000] [--only floor,noop,rows,rows16,aiohttp16,handoff,sdk_call,aiohttp_call]
      [--repeat 3] [--set JSON]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from opt_queue.store import keys
from opt_queue.providers.openai import OpenAIProvider
from opt_queue.core.config import Config
from opt_queue.jobflow.local import EmbeddedRedis
from opt_queue.sim.api import SimConfig, SimKey, SimServer

KEY = "sk-bench-tasks-xxxxxxxxxxxxxxxxxxxxxxxx"
NOOP_APP = '''
import os
from celery import Celery
from opt_queue.queue.app import app as real, transport_options

app = Celery("noop")
app.conf.update({k: v for k, v in real.conf.items() if k.startswith(("task_", "worker_", "broker_"))
                 and k not in ("broker_url",)})
app.conf.broker_url = os.environ["OPT_QUEUE_BROKER_URL"]
app.conf.broker_transport_options = transport_options(3600)
app.conf.task_default_queue = "noop"


@app.task(name="noop", acks_late=True, ignore_result=True)
def noop(job, rows, options=None):
    return None


# what opt-queue's task does besides the row: hand a coroutine to the process's event loop thread
# and wait for it (here a coroutine that does nothing)
import asyncio, threading
_loop = asyncio.new_event_loop()
threading.Thread(target=_loop.run_forever, daemon=True).start()


async def _nothing():
    return None


@app.task(name="handoff", acks_late=True, ignore_result=True)
def handoff(job, rows, options=None):
    return asyncio.run_coroutine_threadsafe(_nothing(), _loop).result()
'''


FLOOR_CLIENT = '''
import asyncio, json, sys, time
import aiohttp


async def main(data, out, base, key):
    rows = [json.loads(line) for line in open(data)]
    gate = asyncio.Semaphore(64)
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(base_url=base.rstrip("/") + "/", headers=headers) as session:
        async def one(row, fh):
            body = {"model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": row["instruction"] + "\\n" + row["input"]}]}
            async with gate:
                async with session.post("chat/completions", json=body) as resp:
                    answer = json.loads(await resp.read())["choices"][0]["message"]["content"]
            fh.write(json.dumps({row["index"]: answer}) + "\\n")

        with open(out, "w") as fh:
            await asyncio.gather(*(one(row, fh) for row in rows[:200]))  # connections open, code warm
            cpu = time.process_time()
            await asyncio.gather(*(one(row, fh) for row in rows[200:]))
            cpu = time.process_time() - cpu
    print(json.dumps({"rows": len(rows) - 200, "cpu": cpu}))


asyncio.run(main(*sys.argv[1:]))
'''


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ROUND_TRIPS: list[float] = []
"""Each run's Redis round trips per task (the server's count of reads, less this poller's own):
unlike CPU time, a neighbour on the machine does not move it."""


def _reads(client: redis.Redis) -> int:
    return int(client.info("stats")["total_reads_processed"])


def wait_drained(client: redis.Redis, queue: str, total: int, pid: int,
                 timeout: float = 900) -> tuple[float, float, float]:
    """Poll until ``queue`` and kombu's unacked hash are empty; return (first taken, all done,
    the worker process's CPU seconds in between)."""
    first = None
    cpu0 = 0.0
    reads0, polls = _reads(client), 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left, unacked = client.pipeline(transaction=False).llen(queue).hlen(keys.UNACKED).execute()
        polls += 1
        now = time.monotonic()
        if first is None and left < total:
            first, cpu0 = now, cpu_seconds(pid)
        if first is not None and left == 0 and unacked == 0:
            ROUND_TRIPS.append((_reads(client) - reads0 - polls - 1) / total)
            return first, now, cpu_seconds(pid) - cpu0
        time.sleep(0.005)
    raise SystemExit(f"{queue} did not drain in {timeout}s")


def bench_noop(d: Path, url: str, rows: int, threads: int, task: str = "noop") -> tuple[float, float]:
    (d / "noop_app.py").write_text(NOOP_APP)
    env = dict(os.environ, OPT_QUEUE_BROKER_URL=url, PYTHONPATH=f"{d}:{os.environ.get('PYTHONPATH', '')}")
    client = redis.Redis.from_url(url)
    client.flushall()
    os.environ["OPT_QUEUE_BROKER_URL"] = url
    sys.path.insert(0, str(d))
    import noop_app  # type: ignore[import-not-found]

    with noop_app.app.producer_or_acquire() as producer:
        for i in range(rows):
            noop_app.app.send_task(task, args=("bench", [[str(i), {}]], {}), queue="noop", producer=producer)
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "noop_app", "worker", "--pool", "threads",
                               "--concurrency", str(threads), "-Q", "noop", "--loglevel", "WARNING",
                               "--without-mingle", "--without-gossip"], env=env, cwd=d,
                              stdout=subprocess.DEVNULL, stderr=open(d / "noop.log", "wb"))
    try:
        first, last, cpu = wait_drained(client, "noop", rows, worker.pid)
    finally:
        worker.terminate()
        worker.wait(30)
    return rows / (last - first), cpu * 1000 / rows


def bench_rows(d: Path, url: str, rows: int, settings: dict, profile: str | None = None) -> tuple[float, float]:
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
        spy = None
        if profile:  # py-spy's collapsed stacks of the worker process, all threads, once rows run
            while client.llen(keys.QUEUE) >= rows and worker.poll() is None:
                time.sleep(0.005)
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(worker.pid), "--format", "raw", "--rate", "250", "--gil", "--nonblocking",
                                    "-o", profile], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            _first, _last, cpu = wait_drained(client, keys.QUEUE, rows, worker.pid)
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(60)
            worker.terminate()
            worker.wait(60)
        stats = sim.stats()
        assert stats["answered"] == rows, stats
    return rows / (stats["last_answer"] - stats["first_call"]), cpu * 1000 / rows


def bench_floor(d: Path, rows: int) -> tuple[float, float]:
    """The minimal client (FLOOR_CLIENT) in its own process: (rows/s, its CPU ms per row)."""
    (d / "floor.py").write_text(FLOOR_CLIENT)
    data = d / "floor.jsonl"
    with open(data, "w") as fh:
        for i in range(rows + 200):
            fh.write(json.dumps({"index": str(i), "instruction": "Translate", "input": f"row {i}"}) + "\n")
    with SimServer(SimConfig(keys=[SimKey(KEY)])) as sim:
        done = subprocess.run([sys.executable, str(d / "floor.py"), str(data), str(d / "floor.out"),
                               sim.base_url, KEY], check=True, capture_output=True, text=True)
        stats = sim.stats()
    got = json.loads(done.stdout)
    return stats["answered"] / (stats["last_answer"] - stats["first_call"]), got["cpu"] * 1000 / got["rows"]


def bench_calls(kind: str, calls: int, in_flight: int = 64) -> tuple[float, float]:
    """The API call alone, as the engine makes it (``providers.openai.OpenAIProvider.call``, ``kind`` "openai":
    through the SDK; "aiohttp": direct): (calls/s, CPU ms per call of the thread that runs the
    event loop). The simulated API runs in another thread, so its CPU is not counted."""
    with SimServer(SimConfig(keys=[SimKey(KEY)])) as sim:
        key = Config.model_validate({"api_keys": [KEY], "api_base": sim.base_url}).keys()[0]

        async def run() -> tuple[float, float]:
            api = OpenAIProvider(kind)
            api.warm_up()
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Translate: row"}]}
            gate = asyncio.Semaphore(in_flight)

            async def one() -> None:
                async with gate:
                    await api.call(key, "/v1/chat/completions", body, 30.0)

            await asyncio.gather(*(one() for _ in range(200)))  # connections open, code warm
            wall, cpu = time.perf_counter(), time.thread_time()
            await asyncio.gather(*(one() for _ in range(calls)))
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            await api.close()
            return calls / wall, cpu * 1000 / calls

        return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--only", default="floor,noop,rows,rows16,aiohttp16")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the cases this many times, interleaved; report each case's median")
    ap.add_argument("--set", default="{}", help="config fields added to every opt-queue run, as JSON")
    ap.add_argument("--profile", metavar="DIR",
                    help="record each opt-queue case's worker with py-spy into DIR/<case>.txt (collapsed stacks; "
                         "the sampling costs the worker CPU, so these runs' figures are not comparable)")
    args = ap.parse_args()
    extra = json.loads(args.set)
    print(f"# machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}"
          + (f"; settings {extra}" if extra else ""))
    cases = {"rows": {}, "rows16": {"rows_per_task": 16}, "aiohttp16": {"rows_per_task": 16, "api_client": "aiohttp"}}
    runs: dict[str, list[tuple[float, float]]] = {}
    round_trips: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        server = EmbeddedRedis(d / "redis", persist=False).start()
        try:
            for _ in range(args.repeat):
                for part in args.only.split(","):
                    if part == "floor":
                        got = bench_floor(d, args.rows)
                    elif part in ("sdk_call", "aiohttp_call"):
                        got = bench_calls("openai" if part == "sdk_call" else "aiohttp", args.rows)
                    elif part in ("noop", "handoff"):
                        # the pool opt-queue gives a worker of the default concurrency and one row a task
                        got = bench_noop(d, server.url, args.rows, 512, part)
                    else:
                        profile = f"{args.profile}/{part}.txt" if args.profile else None
                        got = bench_rows(d, server.url, args.rows, {**cases[part], **extra}, profile)
                    trips = ROUND_TRIPS.pop() if ROUND_TRIPS else None
                    runs.setdefault(part, []).append(got)
                    if trips is not None:
                        round_trips.setdefault(part, []).append(trips)
                    print(json.dumps({part: {"per_s": round(got[0], 1), "cpu_ms_per_task": round(got[1], 3),
                                             "redis_round_trips_per_task": trips and round(trips, 2)}}), flush=True)
        finally:
            server.stop()
    results: dict = {"rows_per_case": args.rows, "repeat": args.repeat}
    for part, got in runs.items():
        results[part] = {"per_s": round(statistics.median(g[0] for g in got), 1),
                         "cpu_ms_per_task": round(statistics.median(g[1] for g in got), 3)}
        if part in round_trips:
            results[part]["redis_round_trips_per_task"] = round(statistics.median(round_trips[part]), 2)
    if "floor" in results:
        for part in runs:  # each figure's CPU per row as a multiple of the minimal client's
            results[part]["cpu_x_floor"] = round(results[part]["cpu_ms_per_task"]
                                                 / results["floor"]["cpu_ms_per_task"], 2)
    if "noop" in results and "rows" in results:
        # the rates' ratio (what the target names), and the same from the worker's CPU per task,
        # which a shared machine's neighbours disturb less
        results["ratio_rows_to_noop"] = round(results["rows"]["per_s"] / results["noop"]["per_s"], 3)
        results["cpu_ratio_rows_to_noop"] = round(results["noop"]["cpu_ms_per_task"]
                                                  / results["rows"]["cpu_ms_per_task"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
