"""The collector's final rewrite at a given size, without a run: peak RSS of a process that collects
a job whose every row is already in ``output.jsonl`` (out of input order, a few nulls later
answered, a share of rows with a warning in ``output.errors.jsonl``: the files of the rewrite's
memory test, ``tests/jobfiles.py``), so it reads the files, rewrites both in input order and ends.

This is the part of a job's memory that grew with its size in the collector (issue 26: ~450 bytes
a row, ~4.5 GB at 10M rows). A full ``bench/scale.py`` run of the code before that issue takes
hours at 1,000,000 rows on a 2-core machine; this measures its collector at that size in seconds,
and the code after it the same way. ``--source`` runs the collector of another checkout (a git
worktree of an older commit): its ``Job`` and ``Collector`` are used as they were.

Each size runs in a fresh process: its kernel high-water mark (``VmHWM``) after the imports and
after the collect; the per-row figure is the growth between two sizes (the slope), so that the
process's fixed memory is not read as a per-row cost.

Run:  python bench/collector_memory.py --rows 100000 1000000
      git worktree add /tmp/before f457363
      python bench/collector_memory.py --rows 100000 1000000 --source /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from jobfiles import answered_out_of_order  # noqa: E402

CHILD = r"""
import json, sys, time
import redis
from opt_queue.jobflow.collector import Collector
from opt_queue.store.jobs import Job

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024

url, job_id, data, out, rows = sys.argv[1:6]
client = redis.Redis.from_url(url)
job = Job(client, job_id)
job.begin_submit(total=int(rows), input=data)
job.end_submit()
before = hwm()
t = time.perf_counter()
status = Collector(client, job_id, out, data).run()
seconds = time.perf_counter() - t
assert status.complete and status.answered == int(rows), status
print(json.dumps({"base": before, "peak": hwm(), "seconds": seconds}))
"""


def measure(rows: int, source: Path, redis_url: str, warn_every: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        data, out, _warned = answered_out_of_order(Path(tmp), rows, warn_every)
        env = dict(os.environ, PYTHONPATH=str(source))
        job_id = f"bench-collector-{uuid.uuid4().hex[:8]}"
        got = subprocess.run([sys.executable, "-c", CHILD, redis_url, job_id, str(data), str(out), str(rows)],
                             capture_output=True, text=True, env=env, cwd=tmp)
        if got.returncode != 0:
            raise SystemExit(got.stderr[-3000:])
        return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="the checkout whose opt_queue runs (default: this one)")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/15",
                    help="a Redis for the job's state (its job keys are left to expire)")
    ap.add_argument("--warn-every", type=int, default=4, help="every N-th row has a warning line (0: none)")
    args = ap.parse_args()
    runs = []
    for rows in args.rows:
        got = measure(rows, args.source, args.redis_url, args.warn_every)
        runs.append((rows, got))
        print(f"# {rows:,} rows: peak {got['peak'] / 1e6:.0f} MB (after imports {got['base'] / 1e6:.0f} MB), "
              f"{got['seconds']:.1f} s", flush=True)
    print(f"\n| collector's final rewrite ({args.source.name}) | " + " | ".join(f"{r:,} rows" for r, _ in runs)
          + " | per row | at 10M rows |")
    print("|---|" + "---|" * (len(runs) + 2))
    peaks = [g["peak"] for _, g in runs]
    if len(runs) >= 2:
        (r0, g0), (r1, g1) = runs[-2], runs[-1]
        slope = (g1["peak"] - g0["peak"]) / (r1 - r0)
        at10m = g1["peak"] + slope * (10_000_000 - r1)
        tail = f" {slope:.0f} B | {at10m / 1e9:.2f} GB |"
    else:
        tail = " | |"
    print("| peak RSS | " + " | ".join(f"{p / 1e6:.0f} MB" for p in peaks) + " |" + tail)
    print("| time | " + " | ".join(f"{g['seconds']:.1f} s" for _, g in runs) + " | | |")


if __name__ == "__main__":
    main()
