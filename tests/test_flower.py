"""Flower, started for real against the test Redis, shows our workers and tasks, never a key."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import TEST_KEY, cli, seed_rows, wait_for, write_config, write_jsonl

from test_providers import ANT_KEY, CLAUDE

from opt_queue.core.config import fingerprint
from opt_queue.jobflow.local import free_port
from opt_queue.sim.api import SimKey, SimServer

AUTH = "admin:s3cret-flower"


def get(url: str, auth: str | None = AUTH) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


@pytest.mark.slow
def test_flower_lists_workers_and_tasks_without_keys_and_refuses_anonymous(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    env = dict(os.environ, OPT_QUEUE_BROKER_URL=redis_url)
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "opt_queue.queue.app", "flower",
                               f"--port={port}", "--address=127.0.0.1", f"--basic-auth={AUTH}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "flower.log", "wb"))
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get(f"{base}/healthcheck", None)[0] == 200, timeout=30, what="flower up")
        sim.configure(latency=0.05, keys=[SimKey(TEST_KEY), SimKey(ANT_KEY)])
        config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, api_keys=[  # one task per row
            TEST_KEY, {"key": ANT_KEY, "provider": "anthropic", "api_base": sim.base_url.removesuffix("/v1")}])
        workers(config, concurrency=4)
        data = write_jsonl(tmp_path / "data.jsonl", [  # chat rows: 20 of the job's model, 4 of a claude model
            {"index": r["index"], **({"model": CLAUDE} if int(r["index"]) >= 20 else {}),
             "messages": [{"role": "system", "content": r["instruction"]}, {"role": "user", "content": r["input"]}]}
            for r in seed_rows(24)])
        out = tmp_path / "output.jsonl"
        assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
        assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0

        def tasks() -> dict:
            status, body = get(f"{base}/api/tasks")
            return json.loads(body) if status == 200 else {}

        wait_for(lambda: len([t for t in tasks().values() if t.get("state") == "SUCCESS"]) == 24,
                 timeout=30, what="flower to see 24 finished tasks, one per row")
        seen = tasks()
        job = next(iter(seen.values()))["args"].split("'")[1]
        assert job.startswith("output-")
        assert sorted(t["name"] for t in seen.values()) == sorted(f"row {job}:{i}" for i in range(24))
        shown = json.dumps(seen)
        assert TEST_KEY not in shown and ANT_KEY not in shown and "Translate" not in shown  # no key, no request
        for task in seen.values():  # the provider beside the fingerprint of the key that answered
            by = "anthropic " + fingerprint(ANT_KEY) if int(task["name"].split(":")[-1]) >= 20 else \
                "openai " + fingerprint(TEST_KEY)
            assert f"'keys': {{'{by}': 1}}" in task["result"], task["result"]
        assert all(t["args"] == repr((job, [t["name"].split(":")[-1]])) for t in seen.values())

        status, body = get(f"{base}/api/workers?refresh=1")
        assert status == 200 and len(json.loads(body)) >= 1
        assert TEST_KEY not in body
        assert get(f"{base}/api/tasks", None)[0] == 401
        assert get(f"{base}/api/tasks", "admin:wrong")[0] == 401
    finally:
        flower.terminate()
        flower.wait(10)


def test_flower_comes_with_the_install() -> None:
    """The README's Flower command needs the ``flower`` package: it is a dependency of opt-queue, not
    an extra that the README's install would leave out."""
    from importlib.metadata import requires

    needed = [r for r in requires("opt-queue") or [] if r.split(">")[0].split("=")[0].strip() == "flower"]
    assert needed and all("extra ==" not in r for r in needed), requires("opt-queue")


@pytest.mark.slow
def test_two_workers_on_one_host_have_distinct_names(tmp_path: Path, sim: SimServer, redis_url: str) -> None:
    """Started without --hostname, as a user starts them: Flower shows each worker by its name."""
    from conftest import kill_group, start_cli

    from opt_queue.queue.app import app, configure

    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url)
    procs = [start_cli("worker", "-c", str(config), "--concurrency", "2", log=tmp_path / f"w{i}.log")
             for i in range(2)]
    try:
        configure(redis_url, 3600)
        names: set[str] = set()

        def both_answer() -> bool:
            names.update(name for reply in app.control.ping(timeout=1.0) for name in reply)
            return len(names) >= 2
        wait_for(both_answer, timeout=60, what="two workers answering a ping")
    finally:
        for p in procs:
            kill_group(p)
    assert len(names) == 2 and all(n.startswith("opt-queue-") for n in names), names
