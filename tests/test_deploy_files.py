"""The files a user deploys with: config.example.json loads; docker-compose.yml is well formed,
lets the worker scale and writes no secret inline."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from opt_queue.config import load_config

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
    assert "ports" not in services["redis"]
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
