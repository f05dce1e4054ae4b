"""``opt-queue demo``: the whole pipeline against the simulated API, offline, in seconds."""

from __future__ import annotations

import json
import os
import time
from importlib import resources
from pathlib import Path

from rich.console import Console

from opt_queue.core.config import load_config
from opt_queue.sim.api import SimConfig, SimKey, SimServer
from opt_queue.cli.ui import run_and_report

DEMO_KEYS = 6
DEMO_RPM = 10          # requests per simulated "minute" ...
DEMO_MINUTE = 2.0      # ... of two seconds: 6 keys x 5 rows/s = 30 rows/s at most


def demo_rows(limit: int) -> list[str]:
    text = resources.files("opt_queue").joinpath("data", "demo.jsonl").read_text(encoding="utf-8")
    return text.splitlines(keepends=True)[:limit]


MODELS = ("gpt-3.5-turbo-0613", "claude-haiku-4-5", "gemini-2.5-flash")
"""``--providers all``: the rows' models in turn, one per provider."""


def mixed_rows(lines: list[str]) -> str:
    """The demo's seed rows as chat rows whose models take turns among the three providers."""
    out = []
    for i, line in enumerate(lines):
        row = json.loads(line)
        messages = ([{"role": "system", "content": row["instruction"]}] if row.get("instruction") else []) + \
            [{"role": "user", "content": row.get("input") or row.get("instruction", "")}]
        out.append(json.dumps({"index": row["index"], "model": MODELS[i % 3], "messages": messages},
                              ensure_ascii=False) + "\n")
    return "".join(out)


def run_demo(directory: Path, rows: int, console: Console, out: Console, lane: str = "sync",
             providers: str = "openai") -> None:
    """Serve the simulated API, write a dataset and a config, run the job, show the result.
    ``providers="all"``: rows of OpenAI, Claude and Gemini models, with each provider's keys."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "data.jsonl"
    lines = demo_rows(rows)
    data.write_text(mixed_rows(lines) if providers == "all" else "".join(lines), encoding="utf-8")
    output = directory / "output.jsonl"
    for stale in (output, directory / "output.errors.jsonl", directory / "output.worker.log"):
        stale.unlink(missing_ok=True)
    keys = [SimKey(f"sk-demo-{i:02d}-not-a-real-key", rpm=DEMO_RPM, tpm=60000) for i in range(DEMO_KEYS)]
    keys.append(SimKey("sk-demo-spent-not-a-real-key", dead="quota"))  # shows a key being retired
    others = []  # --providers all: two Anthropic keys, and two keys of one Gemini project
    if providers == "all":
        others = [SimKey(f"sk-ant-demo-{i}-not-a-real-key", rpm=DEMO_RPM, tpm=20000, otpm=20000) for i in range(2)]
        others += [SimKey(f"AIza-demo-{i}-not-a-real-key", rpm=DEMO_RPM, org="demo-project") for i in range(2)]
    sim = SimConfig(keys=keys + others, minute=DEMO_MINUTE, latency=0.2, latency_jitter=0.3, transient_rate=0.03,
                    batch_delay=3.0, anthropic_token_rounding=1)
    with SimServer(sim) as server:
        config_path = directory / "config.json"
        base = server.base_url.removesuffix("/v1")
        config = {"api_keys": [k.key for k in keys] + [
                      {"key": k.key, "provider": "anthropic" if k.key.startswith("sk-ant") else "gemini",
                       "api_base": base, **({"group": "demo-project"} if k.org else {})} for k in others],
                  "groups": {"demo-project": {"limits": {"requests": [f"{DEMO_RPM}/{DEMO_MINUTE:g}s"]}}}
                  if others else {},
                  "api_base": server.base_url,
                  "header_period": DEMO_MINUTE,  # no limits typed: read from the API's headers
                  "model": {"name": "gpt-3.5-turbo-0613", "temperature": 0.1,
                            "fallback": "gpt-3.5-turbo-16k-0613"},
                  "backoff_base": 0.2, "concurrency": 16, "log_level": "WARNING",
                  "lane": lane, "batch_poll": 1, "prices": {"gpt-3.5-turbo-0613": {"input": 1.5, "output": 2.0}}}
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        os.chmod(config_path, 0o600)
        cfg = load_config(config_path)
        out.print(f"[bold]opt-queue demo[/]: {rows} rows, {DEMO_KEYS} keys at {DEMO_RPM} requests per "
                  f"{DEMO_MINUTE:g}s, discovered from its headers (plus one spent key), simulated API at {server.base_url} with "
                  f"latency and 3% server errors"
                  + ("; a third of the rows for claude-haiku-4-5 (2 Anthropic keys) and a third for "
                     "gemini-2.5-flash (a Gemini project of 2 keys)" if others else ""))
        started = time.monotonic()
        status = run_and_report(console, out, str(data), str(output), cfg, str(config_path), None, 1, False)
        wall = time.monotonic() - started
        stats = server.stats()
    out.print(f"wall time {wall:.1f}s, {status.total / wall:.1f} rows/s end to end; the API saw "
              f"{stats['calls']} calls, {stats['rate_limited']} answered 429 (rate limit), "
              f"{sum(stats['faults'].values())} injected server errors"
              + (f"; {stats['batch'].get('batches', 0)} batches of {stats['batch'].get('lines', 0)} rows "
                 f"through its Batch API" if stats["batch"].get("batches") else ""))
    out.print(f"output: {output}\nerrors: {directory / 'output.errors.jsonl'}\n"
              f"try: opt-queue merge {data} {output} {directory / 'merged.json'}")
