"""Limit fidelity: how close does opt-queue run N keys to their combined limit, with zero 429s?

N keys x R requests per shortened minute (W seconds) on the simulated API, with 300 ms latency and
1% transient server errors; the dataset is K windows' worth of rows. A fresh window admits a burst
of N*R at once, and every further N*R calls need one more window, so the earliest the C-th call
(C = every call the API counted: retries of injected errors included, they use quota too; not
the 429s, for which the server counts nothing) can arrive after the first is

    ideal = W * (ceil(C / (N*R)) - 1)

We report

    active ratio     = ideal / (API's last request - API's first request)
    end-to-end ratio = (ideal + latency) / wall time of `opt-queue run` (start-up, submit, collect)

and the number of 429s. The safety margin m lengthens each window, so the active ratio tends to
W / (W + m): 0.990 for W = 15 s and m = 1% of it (0.15 s) here, 0.996 for a real minute (0.25 s cap).

The ratio measures the limiter only while the machine can send faster than the keys allow. At
1,000 keys x 2 a window the keys take 133 calls a second, about what two cores sustain for the
workers, the simulated API and Redis together. ``--capacity`` first runs the same rows on the same
number of keys without limits (the simulated API enforces none, the config states none), which
gives what the machine sustains in calls a second (``calls_per_s_active`` of that line), and then
reports ``ceiling`` = min(1, capacity / combined limit): the best active ratio this machine allows.

``--limits configured`` writes each key's limit in the config; ``discovered`` writes none (the
original toolkit's config plus ``header_period``): every key is probed, then runs at the limit its
headers give. ``--tokens HOW`` makes the rows token-bound instead: each key allows R rows' worth of
tokens per window (prompt + max_tokens, as the server counts them) and no request limit, and the
simulated API counts a prompt HOW: ``chars4`` (characters / 4, as OpenAI's rate limiter is
reported to), ``o200k`` or ``cl100k`` (a tokenizer), ``typical`` or ``estimator`` (opt-queue's own
count: the one case where client and server agree). The rows are ~1,000 tokens of mixed English and
Chinese with ``max_tokens`` 100, on ``--model`` (gpt-4o-mini: opt-queue counts o200k exactly; a
model of unknown tokenizer such as llama-3.1-8b: it starts from its character estimate, an upper
bound). No figure of this mode rests on the client counting as the server does unless HOW says so.

``--provider anthropic`` runs the same on Anthropic keys (the Messages API of the simulated API,
its ``anthropic-ratelimit-*`` headers, remaining tokens rounded down to thousands as the real API
rounds them): request-bound, or with ``--tokens`` input-token-bound (Anthropic's input window counts
the prompt only, not ``max_tokens``). ``--provider gemini``: one key per Google Cloud project, limits
per project; the Gemini API sends no headers, so *configured* types the project's limits (a group)
and *discovered* learns them from the first ``RESOURCE_EXHAUSTED`` of each project (a 429 each).

``--provider anthropic --output`` makes the rows output-bound instead: each asks ``max_tokens``
``--output-cap`` (1000) and writes ~10 tokens; each key allows R rows' worth of *written* output
tokens per window (``otpm``) and nothing else. A server that counts output as written
(``--sim '{"anthropic_output_count": "actual"}'``) admits R rows a window; one that holds
``max_tokens`` on arrival (the default) admits only what fits beside the caps in flight. The ideal
counts the rows' written tokens: ``W * (ceil(written / (N * otpm)) - 1)``.

Run:  python bench/limits.py [--keys 5 20 100 1000] [--rpm 2] [--window 15] [--limits both]
                             [--tokens chars4|o200k|cl100k|typical|estimator] [--model M]
                             [--provider openai|anthropic|gemini] [--capacity] [--set JSON]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from opt_queue.sim.api import DEFAULT_MODELS, SimConfig, SimKey, SimServer, _Request, sim_answer
from opt_queue.sim.common import count_tokens
from opt_queue.core.tokens import TOKEN_COUNTS


EXTRA: dict = {}
"""Config fields added to every run (``--set``)."""
SIM_EXTRA: dict = {}
"""Simulated API settings added to every run (``--sim``)."""
MODEL = "gpt-4o-mini"
PROVIDER = "openai"
PROVIDER_MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5", "gemini": "gemini-2.5-flash"}
MAX_TOKENS = 100
TEXT = ("The committee reviewed the quarterly figures and asked for a short summary of the risks. "
        "请用一句话总结以下内容，并指出其中最重要的风险。今天的会议讨论了预算和进度。") * 24
"""~1,000 o200k tokens of mixed English and Chinese (the original toolkit's users write Chinese)."""


def token_row(i: int) -> dict:
    return {"index": str(i), "model": MODEL, "max_tokens": MAX_TOKENS,
            "messages": [{"role": "user", "content": f"{i:06d} " + TEXT}]}


OUTPUT_CAP = [1000]


def hi_row(i: int, cap: int = MAX_TOKENS) -> dict:
    return {"index": str(i), "model": MODEL, "max_tokens": cap,
            "messages": [{"role": "user", "content": f"Say hi to row {i}"}]}


def written(i: int) -> int:
    """The output tokens the simulated API writes for row ``i`` (its answer, as it counts them)."""
    return max(1, min(OUTPUT_CAP[0], count_tokens(sim_answer(MODEL, hi_row(i)["messages"]))))


def row_tokens(how: str) -> int:
    """A token-bound row's tokens as the simulated API counts them against its limit (``how``):
    OpenAI's window counts the prompt and max_tokens, Anthropic's and Gemini's the prompt only."""
    req = _Request.of("/v1/chat/completions", token_row(0), MODEL, limit_count=how)
    return req.limit_prompt + (MAX_TOKENS if PROVIDER == "openai" else 0)


def key_entry(secret: str, limit: dict, limits: str) -> object:
    """A key of the config: a string for OpenAI's; an object naming its provider otherwise (a
    Gemini key is its own project: a group, whose limits are typed when ``limits`` is configured)."""
    if PROVIDER == "openai":
        return secret
    entry = {"key": secret, "provider": PROVIDER, "api_base": BASE[0]}
    if PROVIDER == "gemini":
        entry["group"] = "p-" + secret.split("-")[2]  # "AIza-bench-0007-...": project 0007
    return entry


BASE = [""]  # the simulated API's address without /v1 (Anthropic's and Gemini's SDKs add their paths)


def bench(n_keys: int, rpm: int, window: float, windows: int, latency: float, errors: float,
          margin: float, fraction: float, workers: int, concurrency: int, limits: str,
          tokens: str | None, output: bool = False) -> dict:
    per_row = row_tokens(tokens) if tokens else 0
    rows = n_keys * rpm * windows
    out_total = sum(written(i) for i in range(rows)) if output else 0
    out_limit = math.ceil(rpm * out_total / rows) if output else 0  # R rows' worth of written output
    own = ({} if limits == "unlimited" else {"otpm": out_limit} if output else
           {"tpm": rpm * per_row} if tokens else {"rpm": rpm})
    prefix = {"openai": "sk-bench", "anthropic": "sk-ant-bench", "gemini": "AIza-bench"}[PROVIDER]
    keys = [SimKey(f"{prefix}-{i:04d}-xxxxxxxxxxxxxxxx", **own) for i in range(n_keys)]
    sim = SimConfig(keys=keys, minute=window, latency=latency, transient_rate=errors, seed=1,
                    models={**DEFAULT_MODELS, MODEL: 128000}, limit_count=tokens or "typical",
                    usage_count=tokens or "typical", **SIM_EXTRA)
    with SimServer(sim) as server, tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with open(d / "data.jsonl", "w") as fh:
            for i in range(rows):
                row = token_row(i) if tokens else hi_row(i, OUTPUT_CAP[0] if output else MAX_TOKENS)
                fh.write(json.dumps(row) + "\n")
        limit = ({"output_tokens": [f"{out_limit}/{window:g}s"]} if output else
                 {"tokens": [f"{rpm * per_row}/{window:g}s"]} if tokens else {"requests": [f"{rpm}/{window:g}s"]})
        BASE[0] = server.base_url.removesuffix("/v1")
        config = {"api_keys": [key_entry(k.key, limit, limits) for k in keys], "api_base": server.base_url,
                  "header_period": window,
                  "safety_margin": margin, "safety_fraction": fraction, "concurrency": concurrency,
                  "backoff_base": 0.2, "backoff_max": 2, "log_level": "WARNING"}
        if limits == "configured":
            config["limits"] = limit
            if PROVIDER == "gemini":  # a project's limits are its group's
                config["groups"] = {e["group"]: {"limits": limit} for e in config["api_keys"]}
                del config["limits"]
        if not tokens:
            config["model"] = {"name": MODEL}
        config.update(EXTRA)
        (d / "config.json").write_text(json.dumps(config))
        os.chmod(d / "config.json", 0o600)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "opt_queue", "run", str(d / "data.jsonl"), "-c",
                               str(d / "config.json"), "-o", str(d / "out.jsonl"), "--workers", str(workers)],
                              capture_output=True, text=True)
        wall = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"run failed: {proc.stderr[-2000:]}")
        stats = server.stats()
        answered = sum(1 for line in open(d / "out.jsonl") if ": null}" not in line)
    calls = stats["calls"]
    counted = calls - stats["rate_limited"]  # a refused call uses no quota on the server
    ideal = window * (math.ceil(counted / (n_keys * rpm)) - 1)
    if output:  # the rows' written tokens (retried calls write again: the same answer)
        ideal = window * (math.ceil(out_total * counted / rows / (n_keys * out_limit)) - 1)
    active = stats["last_call"] - stats["first_call"]
    if limits == "unlimited":  # what the machine sustains: no ratio to a limit
        return {"keys": n_keys, "limits": "none (capacity)", "limit": "-", "rows": rows, "answered": answered,
                "calls": calls, "ideal_s": "-", "active_s": round(active, 2), "wall_s": round(wall, 2),
                "calls_per_s_active": round((calls - 1) / active, 1),
                "combined_limit_per_s": round(n_keys * rpm / window, 1), "active_ratio": "-",
                "end_to_end_ratio": "-", "http_429": stats["rate_limited"],
                "injected_errors": sum(stats["faults"].values()), "ceiling": "-"}
    return {"keys": n_keys, "limits": limits,
            "limit": (f"{out_limit} out tok/{window:g}s" if output else f"{rpm * per_row} tok/{window:g}s" if tokens
                      else f"{rpm}/{window:g}s"), "rows": rows, "answered": answered, "calls": calls,
            "ideal_s": round(ideal, 2), "active_s": round(active, 2), "wall_s": round(wall, 2),
            "calls_per_s_active": round((calls - 1) / active, 1),
            "combined_limit_per_s": round(n_keys * rpm / window, 1),
            "active_ratio": round(ideal / active, 3), "end_to_end_ratio": round((ideal + latency) / wall, 3),
            "http_429": stats["rate_limited"], "injected_errors": sum(stats["faults"].values()), "ceiling": "-"}


def main() -> None:
    global MODEL, PROVIDER
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, nargs="+", default=[5, 20, 100, 1000])
    ap.add_argument("--rpm", type=int, default=2, help="requests per key per window")
    ap.add_argument("--window", type=float, default=15.0, help="the shortened minute, seconds")
    ap.add_argument("--windows", type=int, default=3, help="dataset size in windows' worth of rows")
    ap.add_argument("--latency", type=float, default=0.3)
    ap.add_argument("--errors", type=float, default=0.01)
    ap.add_argument("--margin", type=float, default=0.25, help="safety_margin: the margin's cap, seconds")
    ap.add_argument("--fraction", type=float, default=0.01, help="safety_fraction: the margin's share of a window")
    ap.add_argument("--limits", choices=["configured", "discovered", "both"], default="both")
    ap.add_argument("--capacity", action="store_true",
                    help="first run the same rows on keys without limits: what the machine sustains; "
                         "the `ceiling` column is then the best active ratio this machine allows")
    ap.add_argument("--set", default="{}", help='more config fields, as JSON: \'{"rows_per_task": 16}\'')
    ap.add_argument("--sim", default="{}", help='simulated API settings, as JSON: \'{"anthropic_token_rounding": 1}\'')
    ap.add_argument("--tokens", choices=TOKEN_COUNTS, default=None,
                    help="token-bound rows; the simulated API counts a prompt this way, and each key "
                         "allows R rows' worth of tokens as it counts them")
    ap.add_argument("--model", default=None, help="the rows' model (default: the provider's: gpt-4o-mini, "
                                                     "claude-haiku-4-5, gemini-2.5-flash)")
    ap.add_argument("--provider", choices=sorted(PROVIDER_MODELS), default="openai",
                    help="whose API the keys speak (the simulated API serves all three)")
    ap.add_argument("--output", action="store_true",
                    help="output-bound rows (--provider anthropic): max_tokens --output-cap, ~10 written, "
                         "each key allows R rows' worth of written output tokens per window")
    ap.add_argument("--output-cap", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=500, help="rows in flight per worker process")
    args = ap.parse_args()
    PROVIDER = args.provider
    MODEL = args.model or PROVIDER_MODELS[PROVIDER]
    OUTPUT_CAP[0] = args.output_cap
    if args.output and (PROVIDER != "anthropic" or args.tokens):
        raise SystemExit("--output is for --provider anthropic, without --tokens")
    EXTRA.update(json.loads(args.set))
    SIM_EXTRA.update(json.loads(args.sim))
    print(f"# machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"# latency {args.latency}s, {args.errors:.0%} transient errors, margin {args.fraction:.0%} "
          f"of a window up to {args.margin}s, tokens: "
          f"{f'the server counts {args.tokens}' if args.tokens else 'output-bound, max_tokens ' + str(args.output_cap) if args.output else 'no (request-bound)'}, provider {PROVIDER}, "
          f"model {MODEL}, "
          f"{args.workers} worker processes x {args.concurrency} rows in flight, settings {EXTRA or 'default'}, "
          f"simulated API {SIM_EXTRA or 'default'}")
    cols = ["keys", "limits", "limit", "rows", "answered", "calls", "ideal_s", "active_s", "wall_s", "calls_per_s_active",
            "combined_limit_per_s", "active_ratio", "ceiling", "end_to_end_ratio", "http_429", "injected_errors"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    modes = ["configured", "discovered"] if args.limits == "both" else [args.limits]
    for n in args.keys:
        capacity = None
        for mode in (["unlimited"] if args.capacity else []) + modes:
            r = bench(n, args.rpm, args.window, args.windows, args.latency, args.errors, args.margin,
                      args.fraction, args.workers, args.concurrency, mode, args.tokens, args.output)
            if mode == "unlimited":
                capacity = r["calls_per_s_active"]
            elif capacity is not None:
                r["ceiling"] = round(min(1.0, capacity / r["combined_limit_per_s"]), 3)
            print("| " + " | ".join(str(r[c]) for c in cols) + " |", flush=True)


if __name__ == "__main__":
    main()
