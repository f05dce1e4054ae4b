"""Money figures: how fast ``estimate`` is, how close it comes to what the API counts, and how far
a budget is overshot.

Figures:
  estimate   seconds for `opt-queue estimate` of an N-row file of mixed English and Chinese rows
             (validation pass included), and as a multiple of a process that only parses each line
  error      the estimate's prompt tokens and cost against the usage the simulated API reports,
             on a job of mixed English and Chinese rows run through `opt-queue run`
  budget     a job whose max_cost allows about a third of it, 2 worker processes: spend / budget,
             and the reservations left (the in-flight bound is 0 when every request has max_tokens)

Run:  python bench/economy.py [--rows 1000000] [--job-rows 2000]
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

from opt_queue.store.jobs import Job, job_id_for
from opt_queue.jobflow.local import EmbeddedRedis
from opt_queue.core.prices import dollars
from opt_queue.sim.api import SimConfig, SimKey, SimServer

KEY = "sk-bench-economy-xxxxxxxxxxxxxxxxxxxx"
PRICES = {"gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.6}}


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        if i % 4 == 3:
            text = f"第 {i} 行：委员会将在明年春天公布调查结果，" + "并附上详细的数据。" * (i % 5)
        else:
            text = f"Row {i}: the committee will publish its findings next spring. " + "More detail. " * (i % 7)
        out.append({"index": str(i), "instruction": "Translate", "input": text})
    return out


def write(path: Path, data: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in data:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def config(d: Path, name: str, **fields: object) -> Path:
    path = d / name
    path.write_text(json.dumps({"api_keys": [KEY], "log_level": "WARNING", "prices": PRICES, **fields}))
    os.chmod(path, 0o600)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "opt_queue", *args], capture_output=True, text=True)


def bench_estimate(d: Path, n: int) -> dict:
    write(d / "big.jsonl", rows(n))  # mixed English and Chinese, 1-7 sentences
    cfg = config(d, "est.json", model={"name": "gpt-4o-mini", "max_tokens": 200}, limits={"rpm": 500})
    started = time.monotonic()
    done = cli("estimate", str(d / "big.jsonl"), "-c", str(cfg), "-o", str(d / "none.jsonl"), "--json")
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    # the reference, same run: a process that only parses every line (what reading a JSONL file
    # costs here), so a loaded machine's figure can be told from a slower estimate
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import json, sys\nfor line in open(sys.argv[1], encoding='utf-8'): "
                    "json.loads(line)", str(d / "big.jsonl")], check=True)
    reference = time.monotonic() - started
    return {"estimate_rows": n, "estimate_wall_s": round(wall, 1), "estimate_rows_per_s": round(n / wall),
            "parse_only_wall_s": round(reference, 1), "estimate_x_parse_only": round(wall / reference, 1)}


def bench_error(d: Path, n: int) -> dict:
    data = write(d / "mixed.jsonl", rows(n))
    with SimServer(SimConfig(keys=[SimKey(KEY)])) as sim:
        cfg = config(d, "err.json", api_base=sim.base_url, model={"name": "gpt-4o-mini", "max_tokens": 60})
        est = json.loads(cli("estimate", str(data), "-c", str(cfg), "-o", str(d / "mixed.out.jsonl"), "--json").stdout)
        assert sim.stats()["calls"] == 0
        done = cli("run", str(data), "-c", str(cfg), "-o", str(d / "mixed.out.jsonl"), "--output-format", "full")
        assert done.returncode == 0, done.stderr
    usages = [v["usage"] for line in open(d / "mixed.out.jsonl") for v in json.loads(line).values()]
    real_in = sum(u["prompt_tokens"] for u in usages)
    real_out = sum(u["completion_tokens"] for u in usages)
    real_cost = (real_in * 0.15 + real_out * 0.6) / 1e6
    return {"error_rows": n, "estimated_prompt_tokens": est["prompt_tokens"], "real_prompt_tokens": real_in,
            "prompt_error": round(est["prompt_tokens"] / real_in - 1, 4),
            "estimated_cost_low": round(est["cost_low"], 6), "estimated_cost_high": round(est["cost_high"], 6),
            "real_cost": round(real_cost, 6)}


def bench_budget(d: Path, n: int) -> dict:
    data = write(d / "budget.jsonl", rows(n))
    out = d / "budget.out.jsonl"
    server = EmbeddedRedis(d / "redis", persist=False).start()
    try:
        with SimServer(SimConfig(keys=[SimKey(KEY)], latency=0.05)) as sim:
            cfg = config(d, "budget.json", api_base=sim.base_url, broker_url=server.url,
                         model={"name": "gpt-4o-mini", "max_tokens": 60})
            worst = json.loads(cli("estimate", str(data), "-c", str(cfg), "-o", str(out), "--json").stdout)
            budget = round(worst["cost_high"] / 3, 6)
            cfg = config(d, "budget.json", api_base=sim.base_url, broker_url=server.url, max_cost=budget,
                         model={"name": "gpt-4o-mini", "max_tokens": 60})
            done = cli("run", str(data), "-c", str(cfg), "-o", str(out), "--workers", "2")
            calls = sim.stats()["calls"]
        meta = Job(redis.Redis.from_url(server.url), job_id_for(out)).meta()
    finally:
        server.stop()
    spent = dollars(meta.get("spent_nano"))
    return {"budget_rows": n, "budget": budget, "budget_spent": round(spent, 6),
            "budget_spent_ratio": round(spent / budget, 4), "budget_reserved_left_nano": int(meta.get("reserved_nano") or 0),
            "budget_calls": calls, "budget_exit": done.returncode, "budget_message": done.stderr.strip().splitlines()[-1][:160]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--job-rows", type=int, default=2000)
    ap.add_argument("--only", default="estimate,error,budget")
    args = ap.parse_args()
    print(f"# machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        parts = args.only.split(",")
        if "estimate" in parts:
            results.update(bench_estimate(d, args.rows))
            print(json.dumps(results), flush=True)
        if "error" in parts:
            results.update(bench_error(d, args.job_rows))
            print(json.dumps(results), flush=True)
        if "budget" in parts:
            results.update(bench_budget(d, args.job_rows))
    print(json.dumps(results, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
