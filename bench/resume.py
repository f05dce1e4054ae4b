"""How long running a finished job again takes: ``opt-queue run`` on an input whose every row
``output.jsonl`` already answers, without and with the ``output.finished.json`` its collector
leaves when the output is complete.

For each size, the input (seed-format rows) and a complete output are written directly (no API
call is made: every row is answered, so nothing is sent). The first run has no
``output.finished.json``: it reads the input and the output, submits nothing, rewrites the output
in input order and leaves the file. The second run finds both files as they were.

Run:  python bench/resume.py --rows 1000000 10000000 [--scan-up-to 1000000]
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

KEY = "sk-bench-resume-xxxxxxxxxxxxxxxxxxxxxx"


def write_job(work: Path, rows: int) -> tuple[Path, Path, Path]:
    data, out, config = work / f"data-{rows}.jsonl", work / f"out-{rows}.jsonl", work / "config.json"
    with open(data, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(f'{{"index": {i}, "instruction": "Name one colour.", "input": "row {i}"}}\n')
    with open(out, "w", encoding="utf-8") as fh:
        for i in range(rows):
            fh.write(f'{{"{i}": "blue"}}\n')
    config.write_text(json.dumps({"api_keys": [KEY], "api_base": "http://127.0.0.1:9/v1", "log_level": "WARNING"}))
    config.chmod(0o600)
    return data, out, config


def timed_run(data: Path, out: Path, config: Path) -> float:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "opt_queue", "run", str(data), "-c", str(config), "-o", str(out),
                           "--workers", "1"], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"opt-queue run failed: {done.stderr[-2000:]}")
    return time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--scan-up-to", type=int, default=1_000_000,
                    help="the largest size run without output.finished.json (the full scan)")
    args = ap.parse_args()
    print(f"# {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| rows | input | full scan (no output.finished.json) | with output.finished.json |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for rows in sorted(args.rows):
            data, out, config = write_job(work, rows)
            stamp = out.with_name(out.name[:-len(".jsonl")] + ".finished.json")
            if rows <= args.scan_up_to:
                scan = f"{timed_run(data, out, config):,.1f} s"
            else:  # the stamp as the collector leaves it, without the scan that writes it
                from opt_queue.jobflow.dataset import file_sha256, mark_finished

                mark_finished(data, file_sha256(data), out, rows)
                scan = "not run"
            assert stamp.exists(), "the first run left no output.finished.json"
            fast = timed_run(data, out, config)
            print(f"| {rows:,} | {data.stat().st_size / 1e9:.2f} GB | {scan} | {fast:,.1f} s |", flush=True)
            for f in (data, out, stamp):
                f.unlink()


if __name__ == "__main__":
    main()
