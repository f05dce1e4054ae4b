"""What ``opt-queue status`` reports: per job progress and per key usage, read from Redis."""

from __future__ import annotations

import json
from typing import Any

import redis

from opt_queue import keys
from opt_queue.jobs import Job, list_jobs


def _now_ms(client: redis.Redis) -> int:
    sec, usec = client.time()
    return int(sec) * 1000 + int(usec) // 1000


def job_status(client: redis.Redis, job_id: str) -> dict[str, Any]:
    """Progress of one job: counters, status, retired keys."""
    job = Job(client, job_id)
    p = job.progress()
    return {"job": job_id, "status": p.status, "reason": p.reason, "total": p.total,
            "enqueued": p.claimed, "finished": p.reported, "nulls": p.nulls, "released": p.released,
            "in_flight_or_queued": p.outstanding, "submitting": p.submitting,
            "prompt_tokens": p.prompt_tokens, "completion_tokens": p.completion_tokens,
            "input": p.meta.get("input"), "output": p.meta.get("output"),
            "model": p.meta.get("model"), "retired_keys": job.retired_keys()}


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def key_status(client: redis.Redis, retired: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every key workers have registered: limits, current window usage, cooldown, counters.

    Three round trips whatever the number of keys (live displays call this every second)."""
    now = _now_ms(client)
    known = [(fp.decode(), json.loads(desc)) for fp, desc in sorted(client.hgetall(keys.KNOWN_KEYS).items())]
    pipe = client.pipeline(transaction=False)
    for fp, desc in known:
        pipe.hgetall(keys.bucket_state(desc["bucket"]))
        pipe.hgetall(keys.key_stats(fp))
        for dim, period in desc.get("windows", []):
            if dim == "req":
                pipe.zcount(keys.bucket_window(desc["bucket"], dim, period), now - int(period * 1000), "+inf")
    replies = iter(pipe.execute())
    out = []
    for fp, desc in known:
        state, stats = _decode(next(replies)), _decode(next(replies))
        usage = {}
        for dim, period in desc.get("windows", []):
            if dim == "req":
                usage[f"requests/{period:g}s"] = next(replies)
            else:
                usage[f"tokens/{period:g}s"] = int(state.get(f"tsum:{int(period * 1000)}", 0))
        cool = int(state.get("cool_until", 0)) - now
        out.append({"key": fp, "bucket": desc["bucket"], "limits": desc["limits"], "api_base": desc["api_base"],
                    "usage": usage, "cooldown_s": round(cool / 1000, 2) if cool > 0 else 0,
                    "learned_requests": int(state.get("learn_requests", 0)) or None,
                    "learned_tokens": int(state.get("learn_tokens", 0)) or None,
                    "rate_limited": int(state.get("rate_limited", 0)),
                    "requests": int(stats.get("requests", 0)), "tokens": int(stats.get("tokens", 0)),
                    "errors": {k.split(":", 1)[1]: int(v) for k, v in stats.items() if k.startswith("error:")},
                    "retired": (retired or {}).get(fp)})
    return out


def snapshot(client: redis.Redis, job_id: str | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (``status --json``)."""
    jobs = [job_id] if job_id else list_jobs(client)
    job_rows = [job_status(client, j) for j in jobs]
    retired: dict[str, str] = {}
    for j in job_rows:
        retired.update(j["retired_keys"])
    return {"jobs": job_rows, "keys": key_status(client, retired)}
