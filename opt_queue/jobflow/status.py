"""What ``opt-queue status`` reports: per job progress and per key usage, read from Redis."""

from __future__ import annotations

import json
from typing import Any

import redis

from opt_queue.store import keys
from opt_queue.store.jobs import Job, list_jobs
from opt_queue.limits.limiter import window_source
from opt_queue.core.prices import dollars


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
            "prompt_tokens": p.prompt_tokens, "completion_tokens": p.completion_tokens, "spend": p.spend,
            "input": p.meta.get("input"), "output": p.meta.get("output"),
            "model": p.meta.get("model"), "retired_keys": job.retired_keys(),
            "lane": p.meta.get("lane") or "sync", "deadline_at": float(p.meta["deadline_at"])
            if p.meta.get("deadline_at") else None, "batches": _batches(client, job_id)}


def _batches(client: redis.Redis, job_id: str) -> list[dict[str, Any]]:
    """The batch lane's chunks of a job: rows, the provider's batch and its status, the key."""
    from opt_queue.lanes.chunks import chunk_states

    return [{"chunk": c, "rows": st.rows, "state": st.state, "batch": st.batch_id, "status": st.status,
             "key": st.key, "attempt": st.attempt, "answered": st.answered, "nulls": st.nulls,
             "moved_on": st.moved} for c, st in sorted(chunk_states(client, job_id).items(), key=lambda kv: int(kv[0]))]


def _decode(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def key_status(client: redis.Redis, retired: dict[str, str] | None = None,
               refresh: float = 600.0) -> list[dict[str, Any]]:
    """Every key workers have registered, with each model it paces (its *scopes*): each window's
    limit and where it came from (configured, learned from the headers or from 429s, default),
    when it was last read, the current usage, cooldown and counters.

    Three round trips whatever the number of keys (live displays call this every second)."""
    now = _now_ms(client)
    known = [(fp.decode(), json.loads(desc)) for fp, desc in sorted(client.hgetall(keys.KNOWN_KEYS).items())]
    scopes: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for scope, desc in sorted(client.hgetall(keys.KNOWN_SCOPES).items()):
        d = json.loads(desc)
        scopes.setdefault(d["bucket"], []).append((scope.decode(), d))
    pipe = client.pipeline(transaction=False)
    buckets = sorted({desc["bucket"] for _, desc in known})
    for bucket in buckets:
        for scope, d in scopes.get(bucket, []):
            pipe.hgetall(keys.bucket_state(scope))
            for dim, period, _limit, _mode in d["windows"]:
                if dim == "req":
                    pipe.zcount(keys.bucket_window(scope, dim, period), now - int(period * 1000), "+inf")
    for fp, _ in known:
        pipe.hgetall(keys.key_stats(fp))
    replies = iter(pipe.execute())
    per_bucket: dict[str, list[dict[str, Any]]] = {}
    for bucket in buckets:
        for scope, d in scopes.get(bucket, []):
            state = _decode(next(replies))
            windows = []
            for dim, period, limit, mode in d["windows"]:
                sums = "osum" if dim == "out" else "tsum"
                used = next(replies) if dim == "req" else int(state.get(f"{sums}:{int(period * 1000)}", 0))
                windows.append(dict(window_source(dim, period, limit, mode, state, now, int(refresh * 1000)),
                                    used=used))
            cool = int(state.get("cool_until", 0)) - now
            per_bucket.setdefault(bucket, []).append(
                {"model": d["model"], "windows": windows, "cooldown_s": round(cool / 1000, 2) if cool > 0 else 0,
                 # how the server counts a prompt, as a share of opt-queue's count (limiter.py)
                 "token_factor": round(float(state["tok_factor"]), 4) if state.get("tok_factor") else None,
                 "token_factor_readings": int(state.get("tok_factor_n", 0)),
                 "rate_limited": int(state.get("rate_limited", 0)),
                 "slowed_down": int(state.get("slowed_down", 0))})
    out = []
    for fp, desc in known:
        stats = _decode(next(replies))
        models = per_bucket.get(desc["bucket"], [])
        usage: dict[str, int] = {}
        for m in models:
            for w in m["windows"]:
                if w["mode"] != "paced":
                    name = f"{ {'req': 'requests', 'tok': 'tokens', 'out': 'output tokens'}[w['dim']]}/{w['period']:g}s"
                    usage[name] = usage.get(name, 0) + w["used"]
        out.append({"key": fp, "provider": desc.get("provider", "openai"), "bucket": desc["bucket"],
                    "limits": desc["limits"], "api_base": desc["api_base"],
                    "models": models, "usage": usage,
                    "cooldown_s": max((m["cooldown_s"] for m in models), default=0),
                    "rate_limited": sum(m["rate_limited"] for m in models),
                    "requests": int(stats.get("requests", 0)), "tokens": int(stats.get("tokens", 0)),
                    "spend": {"cost": dollars(stats.get("spent_nano")), "unpriced_calls": int(stats.get("unpriced_calls", 0)),
                              **{name: int(stats.get(name, 0)) for name in
                                 ("input_tokens", "cached_tokens", "output_tokens", "reasoning_tokens")}},
                    "errors": {k.split(":", 1)[1]: int(v) for k, v in stats.items() if k.startswith("error:")},
                    "retired": (retired or {}).get(fp)})
    return out


def snapshot(client: redis.Redis, job_id: str | None = None, refresh: float = 600.0) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (``status --json``)."""
    jobs = [job_id] if job_id else list_jobs(client)
    job_rows = [job_status(client, j) for j in jobs]
    retired: dict[str, str] = {}
    for j in job_rows:
        retired.update(j["retired_keys"])
    return {"jobs": job_rows, "keys": key_status(client, retired, refresh)}
