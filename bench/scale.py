"""How memory grows with a job: peak RSS of every process of ``opt-queue run``, the private Redis's
used memory and append-only file, and what each costs per row, in the synchronous or batch lane.

Each size runs ``opt-queue run`` (private Redis, ``--workers`` local worker processes, the
collector in the main process) on ``--rows`` short chat rows against the simulated API, with keys
fast enough that the engine, not the limits, sets the pace. A sampler walks the run's process tree
every ``--every`` seconds and keeps, per process, the kernel's high-water mark of its resident set
(``VmHWM``); it reads the private Redis's ``used_memory`` and the size of its AOF directory, and
keeps their peaks. Per-row costs are the growth between two sizes (the slope), not a peak divided
by rows: a process's fixed start-up memory is not a per-row cost. The 10M column extrapolates
that slope from the largest size run.

Run:  python bench/scale.py --lane batch --rows 100000 1000000
      python bench/scale.py --lane sync --rows 20000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from opt_queue.jobflow.runner import BROKER_FILE, state_dir
from opt_queue.sim.api import SimConfig, SimKey, SimServer

KEY = "sk-bench-scale-xxxxxxxxxxxxxxxxxxxxxxx"
TEN_MILLION = 10_000_000


@dataclass
class Peaks:
    """What one run reached."""

    rows: int
    seconds: float = 0.0
    rss: dict[str, int] = field(default_factory=dict)
    """Peak resident bytes per role (the largest process of the role)."""
    redis_used: int = 0
    aof: int = 0
    aof_rewrites: int = 0


def role(cmdline: list[str]) -> str | None:
    text = " ".join(cmdline)
    if "redis-server" in text:
        return "redis-server (RSS)"
    if " worker" in text and "opt_queue" in text:
        return "worker"
    if " run " in text and "opt_queue" in text:
        return "run: submit + collector"
    return None


def children(root: int) -> list[int]:
    """``root`` and every descendant of it now."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    parent[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += [p for p, pp in parent.items() if pp == pid]
    return found


def high_water(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return [part.decode(errors="replace") for part in fh.read().split(b"\0") if part]


def sample(proc: subprocess.Popen[bytes], out: Path, peaks: Peaks, every: float) -> None:
    """Until ``proc`` ends: every process's high-water mark, Redis' memory and AOF (the private
    Redis of ``run`` on ``out``, found by the URL it leaves in its state directory)."""
    by_pid: dict[int, tuple[str, int]] = {}
    client: redis.Redis | None = None
    state = state_dir(out)
    base_size = None
    while proc.poll() is None:
        for pid in children(proc.pid):
            try:
                name = role(cmdline(pid))
                if name is not None:
                    by_pid[pid] = (name, max(high_water(pid), by_pid.get(pid, ("", 0))[1]))
            except (OSError, ValueError, IndexError):
                continue  # it ended meanwhile
        if client is None and (state / BROKER_FILE).exists():
            client = redis.Redis.from_url((state / BROKER_FILE).read_text().strip(), socket_timeout=2)
        if client is not None:
            try:
                memory, persistence = client.info("memory"), client.info("persistence")
                peaks.redis_used = max(peaks.redis_used, int(memory["used_memory"]))
                if base_size is not None and persistence.get("aof_base_size") != base_size:
                    peaks.aof_rewrites += 1  # (Redis 6 counts none: a rewrite sets a new base size)
                base_size = persistence.get("aof_base_size")
            except redis.RedisError:
                pass  # the run is closing
        if state.exists():
            try:
                size = sum(f.stat().st_size for f in state.rglob("appendonly*") if f.is_file())
            except OSError:
                size = 0
            peaks.aof = max(peaks.aof, size)
        time.sleep(every)
    for name, rss in by_pid.values():
        peaks.rss[name] = max(peaks.rss.get(name, 0), rss)


def run_once(server: SimServer, lane: str, rows: int, workers: int, every: float, work: Path,
             window: int | None, extra: dict[str, object]) -> Peaks:
    data = work / f"data-{rows}.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(json.dumps({"index": str(i), "messages": [
                {"role": "user", "content": f"Row {i}: name one colour."}]}) + "\n")
    out = work / f"out-{lane}-{rows}.jsonl"
    config = work / f"config-{lane}-{rows}.json"
    config.write_text(json.dumps({"api_keys": [KEY], "api_base": server.base_url, "lane": lane,
                                  "model": {"name": "gpt-4o-mini", "max_tokens": 5}, "batch_poll": 1.0,
                                  "log_level": "WARNING",
                                  **({"batch_max_queued" if lane == "batch" else "max_queued": window}
                                     if window is not None else {}), **extra}))
    peaks = Peaks(rows)
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "opt_queue", "run", str(data), "-c", str(config), "-o", str(out),
                             "--workers", str(workers)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    sampler = threading.Thread(target=sample, args=(proc, out, peaks, every), daemon=True)
    sampler.start()
    try:
        _, err = proc.communicate()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        raise
    sampler.join()
    peaks.seconds = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"opt-queue run failed ({proc.returncode}): {err.decode()[-2000:]}")
    with open(out, "rb") as fh:
        written = sum(1 for _ in fh)
    if written != rows:
        raise SystemExit(f"{out}: {written} lines for {rows} rows")
    return peaks


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB" if abs(n) >= 1e6 else f"{n / 1e3:,.1f} kB"


def table(lane: str, runs: list[Peaks]) -> list[str]:
    """Markdown rows: each measure at each size, its growth per row and at 10M rows."""
    measures = sorted({name for p in runs for name in p.rss}) + ["Redis used_memory", "Redis AOF"]

    def value(p: Peaks, name: str) -> int:
        return p.redis_used if name == "Redis used_memory" else p.aof if name == "Redis AOF" else p.rss.get(name, 0)

    sizes = " | ".join(f"{p.rows:,} rows" for p in runs)
    lines = [f"| {lane} lane | {sizes} | per row | at 10M rows |", "|---" * (len(runs) + 3) + "|"]
    small, large = runs[0], runs[-1]
    for name in measures:
        slope = ((value(large, name) - value(small, name)) / (large.rows - small.rows)
                 if len(runs) > 1 and large.rows > small.rows else float("nan"))
        at_10m = value(large, name) + slope * (TEN_MILLION - large.rows)
        cells = " | ".join(mb(value(p, name)) for p in runs)
        lines.append(f"| {name} | {cells} | {slope:,.0f} B | {mb(max(at_10m, value(large, name)))} |")
    seconds = " | ".join(f"{p.seconds:,.0f} s, {p.aof_rewrites} AOF rewrites" for p in runs)
    lines.append(f"| wall time | {seconds} | | |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lane", choices=["sync", "batch"], default="batch")
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--every", type=float, default=0.5, help="seconds between two samples")
    ap.add_argument("--window", type=int, help="max_queued (sync) or batch_max_queued (batch); default: "
                                                "the config's default (50,000; 500,000)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                    help='a config field, e.g. --set rows_per_task=16 --set api_client=\\"aiohttp\\"')
    ap.add_argument("--json", type=Path, help="append each run's peaks to this file")
    args = ap.parse_args()
    print(f"# {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    sim = SimConfig(keys=[SimKey(KEY, rpm=10_000_000, tpm=10_000_000_000)], latency=0.0, batch_delay=2.0)
    runs = []
    with tempfile.TemporaryDirectory() as tmp, SimServer(sim) as server:
        for rows in sorted(args.rows):
            server.api.reset_stats()
            extra = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
            peaks = run_once(server, args.lane, rows, args.workers, args.every, Path(tmp), args.window, extra)
            runs.append(peaks)
            print(f"# {args.lane} {rows:,} rows: {peaks.seconds:,.0f} s, {json.dumps(peaks.__dict__)}", flush=True)
            if args.json:
                with open(args.json, "a") as fh:
                    fh.write(json.dumps({"lane": args.lane, "window": args.window, **peaks.__dict__}) + "\n")
    print("\n".join(table(args.lane, runs)))


if __name__ == "__main__":
    main()
