"""The same dataset through the synchronous, Flex and Batch lanes on the simulated API: cost, wall
time, API calls, and batches.

The simulated API: one key of ``--rpm`` requests per (shortened) minute of ``--minute`` seconds,
``--latency`` seconds per synchronous answer, Flex answers ``--flex-latency`` slower and refused
for capacity at ``--flex-unavailable`` (such rows go at the standard tier), batches that finish
``--batch-delay`` seconds after their creation. Each lane runs ``opt-queue run`` (private Redis,
2 local worker processes) on the same rows into a fresh output. Cost is what opt-queue counted;
the "list price" column is the same usage at the synchronous price, for the ratio.

Run:  python bench/lanes.py [--rows 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opt_queue.sim.api import SimConfig, SimKey, SimServer

KEY = "sk-bench-lanes-xxxxxxxxxxxxxxxxxxxxxxx"
PRICES = {"gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--rpm", type=int, default=600)
    ap.add_argument("--minute", type=float, default=10.0)
    ap.add_argument("--latency", type=float, default=0.3)
    ap.add_argument("--flex-latency", type=float, default=0.6)
    ap.add_argument("--flex-unavailable", type=float, default=0.05)
    ap.add_argument("--batch-delay", type=float, default=20.0)
    args = ap.parse_args()
    print(f"# {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    sim = SimConfig(keys=[SimKey(KEY, rpm=args.rpm)], minute=args.minute, latency=args.latency,
                    flex_latency=args.flex_latency, flex_unavailable_rate=args.flex_unavailable,
                    batch_delay=args.batch_delay)
    print("| lane | rows | wall s | synchronous calls | batches | cost | at the sync price | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp, SimServer(sim) as server:
        d = Path(tmp)
        data = d / "data.jsonl"
        with open(data, "w", encoding="utf-8") as fh:
            for i in range(args.rows):
                fh.write(json.dumps({"index": str(i), "messages": [
                    {"role": "user", "content": f"Row {i}: summarise the committee's findings. " * (1 + i % 4)}]})
                         + "\n")
        for lane in ("sync", "flex", "batch"):
            server.api.reset_stats()
            cfg = d / f"{lane}.json"
            cfg.write_text(json.dumps({"api_keys": [KEY], "api_base": server.base_url, "prices": PRICES,
                                       "header_period": args.minute, "lane": lane, "batch_poll": 1,
                                       "model": {"name": "gpt-4o-mini", "max_tokens": 40},
                                       "log_level": "WARNING"}))
            os.chmod(cfg, 0o600)
            out = d / f"{lane}.jsonl"
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "opt_queue", "run", str(data), "-c", str(cfg), "-o",
                                   str(out), "--workers", "2", "--output-format", "full"],
                                  check=True, capture_output=True, text=True)
            wall = time.monotonic() - started
            stats = server.stats()
            lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
            usage = [v["usage"] for line in lines for v in line.values() if v]
            list_price = sum(u["prompt_tokens"] * 0.15 + u["completion_tokens"] * 0.6 for u in usage) / 1e6
            found = re.search(r"spend: \$([\d.,]+) spent", done.stdout)
            cost = float(found.group(1).replace(",", "")) if found else float("nan")
            print(f"| {lane} | {len(usage)} | {wall:.1f} | {stats['calls']} "
                  f"({stats['faults'].get('flex_unavailable', 0)} refused for Flex capacity) "
                  f"| {stats['batch'].get('batches', 0)} | ${cost:.4f} | ${list_price:.4f} | {cost / list_price:.3f} |")


if __name__ == "__main__":
    main()
