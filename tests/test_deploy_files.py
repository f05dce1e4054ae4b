"""The files a user deploys with: config.example.json loads; docker-compose.yml is well formed,
lets the worker scale and writes no secret inline."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import assert_complete, cli, seed_rows, write_config, write_jsonl
from dotenv import dotenv_values

from opt_queue.core.config import load_config
from opt_queue.sim.api import SimServer

ROOT = Path(__file__).resolve().parent.parent


def test_config_example_is_a_valid_config() -> None:
    cfg = load_config(ROOT / "config.example.json", env={})
    assert len(cfg.keys()) == 2 and cfg.model.fallback


def test_compose_worker_scales_and_holds_no_inline_secret() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    services = compose["services"]
    assert set(services) >= {"redis", "worker", "flower"}
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    assert worker["build"]["dockerfile"] == "workers/Dockerfile" and (ROOT / "workers/Dockerfile").exists()
    assert any(v.endswith(":ro") for v in worker["volumes"])
    assert "--appendonly yes" in " ".join(services["redis"]["command"]) and "healthcheck" in services["redis"]
    assert all(p.startswith("127.0.0.1:") for p in services["redis"]["ports"])  # the host's commands only
    assert all(p.startswith("127.0.0.1:") for p in services["flower"]["ports"])
    assert not re.search(r"sk-[A-Za-z0-9]{8,}", text)
    for svc in services.values():
        for value in (svc.get("environment") or {}).values():
            if any(word in str(value).lower() for word in ("password", "auth", "key")):
                assert "${" in str(value), f"secret written inline: {value}"


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    """Validate against the Compose Specification schema (check-jsonschema ships it, offline)."""
    exe = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    return subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    ok = check_compose(ROOT / "docker-compose.yml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("restart: unless-stopped",
                                                                        "restart: [sometimes]", 1))
    assert check_compose(broken).returncode != 0  # the validator really checks


def test_the_entrypoint_runs_workers_flower_and_host_commands(tmp_path: Path) -> None:
    """workers/entrypoint.sh, without Docker: stand-ins for opt-queue and celery print what
    they were asked to run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("opt-queue", "celery"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho {name} "$@"\n')
        stub.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")

    def entry(*args: str) -> str:
        done = subprocess.run(["sh", str(ROOT / "workers/entrypoint.sh"), *args], capture_output=True,
                              text=True, env=env, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert entry() == "opt-queue worker"
    assert entry("worker", "--concurrency", "64") == "opt-queue worker --concurrency 64"
    assert entry("flower").startswith("celery -A opt_queue.queue.app flower --port=5555 --persistent=True")
    assert entry("submit", "data.jsonl", "-o", "out.jsonl") == "opt-queue submit data.jsonl -o out.jsonl"
    assert entry("collect", "-o", "out.jsonl") == "opt-queue collect -o out.jsonl"
    assert entry("echo", "anything") == "anything"


def test_env_example_gives_the_host_commands_the_compose_redis() -> None:
    values = dotenv_values(ROOT / ".env.example")  # interpolated as the CLI reads it
    assert values["OPT_QUEUE_BROKER_URL"] == \
        f"redis://:{values['REDIS_PASSWORD']}@127.0.0.1:{values['OPT_QUEUE_REDIS_PORT']}/0"
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["services"]["redis"]["ports"] == ["127.0.0.1:${OPT_QUEUE_REDIS_PORT:-6380}:6379"]


@pytest.mark.slow
def test_host_commands_find_the_fleet_through_the_env_file(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    """The compose flow from the host: workers run against the shared Redis; submit and collect,
    run in the directory holding .env, find it with nothing typed (no broker_url in the config,
    none in the environment)."""
    host, port = redis_url.removeprefix("redis://").split("/")[0].rsplit(":", 1)
    (tmp_path / ".env").write_text(f"OPT_QUEUE_REDIS_PORT={port}\n"
                                   f"OPT_QUEUE_BROKER_URL=redis://{host}:${{OPT_QUEUE_REDIS_PORT}}/0\n")
    workers(write_config(tmp_path / "fleet.json", sim, broker_url=redis_url), concurrency=8)
    config = write_config(tmp_path / "config.json", sim)
    data = write_jsonl(tmp_path / "data.jsonl", seed_rows(12))
    submitted = cli("submit", "data.jsonl", "-c", "config.json", "-o", "output.jsonl", cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    assert cli("collect", "-c", "config.json", "-o", "output.jsonl", cwd=tmp_path).returncode == 0
    assert_complete(data, tmp_path / "output.jsonl")
    elsewhere = cli("status", "-c", str(config), env={"OPT_QUEUE_ENV_FILE": ""}, cwd=tmp_path)
    assert elsewhere.returncode == 2 and "broker" in elsewhere.stderr  # the file is what found it
