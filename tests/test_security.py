"""No key anywhere: logs, task messages, Redis, status, exceptions, the errors file, the output."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import redis
from conftest import cli, queued_rows, seed_rows, write_config, write_jsonl

from opt_queue.core.config import fingerprint
from opt_queue.jobflow.local import LocalWorkers
from opt_queue.sim.api import SimKey, SimServer

GOOD = "sk-proj-GOODgoodGOODgood1234567890abcdef"
REVOKED = "sk-proj-REVOKEDrevokedREVOKED0987654321"


def _message_body(item: bytes) -> str:
    """The decoded body of a queued task message (kombu stores it base64-encoded), else ''."""
    try:
        return base64.b64decode(json.loads(item)["body"]).decode()
    except (ValueError, KeyError, TypeError):
        return ""


def dump_redis(client: redis.Redis) -> str:
    """Every key and value in the server, as text."""
    parts = []
    for name in client.scan_iter(count=1000):
        kind = client.type(name).decode()
        parts.append(repr(name))
        if kind == "string":
            parts.append(repr(client.get(name)))
        elif kind == "hash":
            parts.append(repr(client.hgetall(name)))
        elif kind == "list":
            items = client.lrange(name, 0, -1)
            parts.append(repr(items))
            parts += [_message_body(item) for item in items]  # task bodies are base64 inside
        elif kind == "set":
            parts.append(repr(client.smembers(name)))
        elif kind == "zset":
            parts.append(repr(client.zrange(name, 0, -1, withscores=True)))
        elif kind == "stream":
            parts.append(repr(client.xrange(name)))
    return "\n".join(parts)


def work_and_collect(tmp_path: Path, config: Path, out: Path, redis_url: str) -> tuple[Any, str]:
    """Run workers (DEBUG logs) and the collector on a submitted job: the collector's result and
    the worker log."""
    worker_log = tmp_path / "worker.log"
    workers = LocalWorkers(redis_url, str(config), concurrency=4, loglevel="DEBUG", log_file=worker_log).start()
    try:
        collected = cli("collect", "-c", str(config), "-o", str(out))
    finally:
        workers.stop()
    assert collected.returncode == 0, collected.stderr
    return collected, worker_log.read_text(errors="replace")


def work_and_gather(tmp_path: Path, config: Path, out: Path, redis_url: str, rclient: redis.Redis,
                    submitted: Any, queued: str) -> tuple[str, Any]:
    """:func:`work_and_collect`, then everything a key could leak into (the commands' output, the
    queue, the worker log, Redis, status, the output files) and ``status --json``'s result."""
    collected, log = work_and_collect(tmp_path, config, out, redis_url)
    status = cli("status", "-c", str(config), "--json")
    table = cli("status", "-c", str(config))
    everything = "\n".join([
        submitted.stdout, submitted.stderr, queued, collected.stdout, collected.stderr,
        log, dump_redis(rclient), status.stdout, table.stdout,
        out.read_text(encoding="utf-8"), (tmp_path / "output.errors.jsonl").read_text(encoding="utf-8")])
    return everything, status


def test_known_keys_never_leave_the_config(tmp_path: Path, sim: SimServer, redis_url: str,
                                           rclient: redis.Redis) -> None:
    sim.configure(keys=[SimKey(GOOD), SimKey(REVOKED, dead="invalid")], transient_rate=0.2, seed=5)
    rows = seed_rows(30) + [{"index": "long", "instruction": "x", "input": "y" * 40000}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, api_keys=[GOOD, REVOKED], broker_url=redis_url,
                          log_level="DEBUG")
    submitted = cli("submit", str(data), "-c", str(config), "-o", str(out))
    assert submitted.returncode == 0
    queued = dump_redis(rclient)  # task messages waiting in the queue
    assert queued_rows(rclient) == [str(i) for i in range(30)] + ["long"]
    assert "Translate to English" in queued  # the decoded task bodies are scanned too

    everything, status = work_and_gather(tmp_path, config, out, redis_url, rclient, submitted, queued)
    for secret in (GOOD, REVOKED):
        assert secret not in everything
        assert secret[8:24] not in everything  # not even a long fragment
    errors = [json.loads(line) for line in (tmp_path / "output.errors.jsonl").read_text().splitlines()]
    assert [e["index"] for e in errors] == ["long"] and errors[0]["key"].startswith("key-")
    revoked = fingerprint(REVOKED)  # the dead key is named, by its fingerprint, in both places
    assert f"key {revoked} retired" in (tmp_path / "worker.log").read_text()
    assert revoked in json.loads(status.stdout)["jobs"][0]["retired_keys"]


ANT_GOOD = "sk-ant-api03-GOODgoodGOODgood1234567890abcdefAA"
ANT_REVOKED = "sk-ant-api03-REVOKEDrevokedREVOKED0987654321AA"
GEM_GOOD = "AIzaSyGOODgoodGOODgood1234567890abcdefgh"
GEM_REVOKED = "AIzaSyREVOKEDrevokedREVOKED0987654321xy"


def test_keys_of_every_provider_never_leave_the_config(tmp_path: Path, sim: SimServer, redis_url: str,
                                                       rclient: redis.Redis) -> None:
    sim.configure(keys=[SimKey(GOOD), SimKey(ANT_GOOD), SimKey(ANT_REVOKED, dead="invalid"),
                        SimKey(GEM_GOOD, org="p1"), SimKey(GEM_REVOKED, dead="invalid", org="p2")],
                  transient_rate=0.1, seed=7)  # the errors' messages and the retries' logs are scanned too
    models = ("gpt-4o-mini", "claude-haiku-4-5", "gemini-2.5-flash")
    rows = [{"index": str(i), "model": models[i % 3],
             "messages": [{"role": "user", "content": f"row {i}: Translate to English"}]} for i in range(9)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    base = sim.base_url.removesuffix("/v1")
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, log_level="DEBUG", api_keys=[
        GOOD, *({"key": k, "provider": "anthropic", "api_base": base} for k in (ANT_GOOD, ANT_REVOKED)),
        *({"key": k, "provider": "gemini", "api_base": base} for k in (GEM_GOOD, GEM_REVOKED))])
    submitted = cli("submit", str(data), "-c", str(config), "-o", str(out))
    assert submitted.returncode == 0, submitted.stderr
    queued = dump_redis(rclient)
    everything, status = work_and_gather(tmp_path, config, out, redis_url, rclient, submitted, queued)
    for secret in (GOOD, ANT_GOOD, ANT_REVOKED, GEM_GOOD, GEM_REVOKED):
        assert secret not in everything
        assert secret[10:26] not in everything  # not even a long fragment
    assert sum(1 for line in out.read_text().splitlines() if '": "answer ' in line) == 9
    keys = {k["key"]: k for k in json.loads(status.stdout)["keys"]}
    assert {keys[fingerprint(k)]["provider"] for k in (ANT_GOOD, ANT_REVOKED)} == {"anthropic"}
    assert {keys[fingerprint(k)]["provider"] for k in (GEM_GOOD, GEM_REVOKED)} == {"gemini"}
    retired = json.loads(status.stdout)["jobs"][0]["retired_keys"]
    called = sim.stats()["calls_per_key"]
    for revoked in (ANT_REVOKED, GEM_REVOKED):  # a revoked key that was called is named, by fingerprint
        assert (fingerprint(revoked) in retired) == bool(called.get(fingerprint(revoked)))
    assert set(retired) & {fingerprint(ANT_REVOKED), fingerprint(GEM_REVOKED)}


def test_the_batch_lane_keeps_keys_out_of_redis_files_metadata_and_logs(
        tmp_path: Path, sim: SimServer, redis_url: str, rclient: redis.Redis) -> None:
    # OpenAI's Batch API (uploaded files, metadata), Anthropic's Message Batches and Gemini's Batch
    # Mode (inline requests, display names)
    sim.configure(keys=[SimKey(GOOD), SimKey(REVOKED, dead="invalid"), SimKey(ANT_GOOD), SimKey(GEM_GOOD, org="p1")],
                  batch_delay=0.5)
    models = ("gpt-4o-mini", "claude-haiku-4-5", "gemini-2.5-flash")
    data = write_jsonl(tmp_path / "data.jsonl", [
        {"index": r["index"], "model": models[int(r["index"]) % 3],
         "messages": [{"role": "system", "content": r["instruction"]}, {"role": "user", "content": r["input"]}]}
        for r in seed_rows(30)])
    out = tmp_path / "output.jsonl"
    base = sim.base_url.removesuffix("/v1")
    config = write_config(tmp_path / "config.json", sim, api_keys=[
        REVOKED, GOOD, {"key": ANT_GOOD, "provider": "anthropic", "api_base": base},
        {"key": GEM_GOOD, "provider": "gemini", "api_base": base}], broker_url=redis_url,
        log_level="DEBUG", lane="batch", batch_max_lines=10, batch_poll=0.5)
    submitted = cli("submit", str(data), "-c", str(config), "-o", str(out))
    assert submitted.returncode == 0
    chunks = dump_redis(rclient)  # the batch files waiting in Redis
    assert "Translate to English" in chunks
    collected, log = work_and_collect(tmp_path, config, out, redis_url)
    uploaded = b"".join(sim.api.batches.files.values()).decode()
    made = sim.api.batches.batches.values()
    assert {b.kind for b in made} == {"openai", "anthropic", "gemini"}
    metadata = repr([(b.metadata, b.lines) for b in made])  # display names, the inline requests
    everything = "\n".join([submitted.stdout, submitted.stderr, chunks, collected.stdout, collected.stderr,
                            log, dump_redis(rclient), uploaded, metadata,
                            cli("status", "-c", str(config), "--json").stdout, out.read_text(encoding="utf-8")])
    for secret in (GOOD, REVOKED, ANT_GOOD, GEM_GOOD):
        assert secret not in everything and secret[8:24] not in everything
    assert sum(1 for line in out.read_text().splitlines() if '": "answer ' in line) == 30
    # found dead by its first upload (uploads are free), then retired: at most one try per file
    assert 1 <= sim.stats()["calls_per_key"].get(fingerprint(REVOKED), 0) <= 3
