"""What Sentinel and durable results cost: `opt-queue run` rows/s on a zero-latency, unlimited
simulated API through one Redis, through Sentinels without waiting for replicas
(`replica_acks: 0`), and through Sentinels with each result on a replica before its task is
acknowledged (`replica_acks: 1`, the default under Sentinel). The three run interleaved, `--reps`
times each, on a master with two replicas and three Sentinels on loopback; figures are medians and
ratios to the single-Redis run of the same round.

Run:  python bench/failover.py [--rows 5000] [--reps 3] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cluster import MASTER, SentinelCluster  # noqa: E402

from opt_queue.jobflow.local import EmbeddedRedis  # noqa: E402
from opt_queue.sim.api import SimConfig, SimKey, SimServer  # noqa: E402

KEY = "sk-bench-failover-xxxxxxxxxxxxxxxxxx"


def run(d: Path, name: str, config: dict, rows: int, workers: int) -> float:
    data = d / "data.jsonl"
    if not data.exists():
        with open(data, "w") as fh:
            for i in range(rows):
                fh.write(json.dumps({"index": str(i), "instruction": "Translate", "input": f"row {i}"}) + "\n")
    cfg = d / f"{name}.json"
    cfg.write_text(json.dumps({"api_keys": [KEY], "log_level": "WARNING", "limits": {}, **config}))
    os.chmod(cfg, 0o600)
    out = d / f"{name}.out.jsonl"
    out.unlink(missing_ok=True)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "opt_queue", "run", str(data), "-o", str(out), "-c", str(cfg),
                           "--workers", str(workers), "--job", f"{name}-{time.time_ns()}"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return rows / (time.monotonic() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, SimServer(SimConfig(keys=[SimKey(KEY)])) as sim:
        d = Path(tmp)
        single = EmbeddedRedis(d / "single", persist=False).start()
        cluster = SentinelCluster(d / "cluster").start()
        try:
            base = {"api_base": sim.base_url}
            setups = {
                "single": {**base, "broker_url": single.url},
                "sentinel_acks0": {**base, "broker_url": cluster.url, "sentinel_master": MASTER, "replica_acks": 0},
                "sentinel_acks1": {**base, "broker_url": cluster.url, "sentinel_master": MASTER, "replica_acks": 1},
            }
            got: dict[str, list[float]] = {name: [] for name in setups}
            ratios: dict[str, list[float]] = {name: [] for name in setups}
            for _ in range(args.reps):
                round_ = {name: run(d, name, cfg, args.rows, args.workers) for name, cfg in setups.items()}
                for name, rate in round_.items():
                    got[name].append(rate)
                    ratios[name].append(rate / round_["single"])
        finally:
            cluster.stop()
            single.stop()
    print(json.dumps({
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "rows": args.rows, "reps": args.reps,
        "workers": args.workers,
        "rows_per_s": {n: round(statistics.median(v), 1) for n, v in got.items()},
        "ratio_to_single": {n: round(statistics.median(v), 3) for n, v in ratios.items()},
        "ratio_runs": {n: [round(r, 3) for r in v] for n, v in ratios.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
