"""The Flex lane: service_tier flex at half price, and the standard tier when Flex has no room."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli, read_jsonl, write_config, write_jsonl

from opt_queue.simapi import SimServer

PRICES = {"gpt-4o-mini": {"input": 100.0, "output": 200.0}}


def rows(n: int) -> list[dict]:  # type: ignore[type-arg]
    return [{"index": str(i), "messages": [{"role": "user", "content": f"Describe item {i} in one line."}]}
            for i in range(n)]


@pytest.mark.slow
def test_the_flex_lane_pays_half_and_falls_back_to_the_standard_tier(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(flex_unavailable_rate=0.3, flex_latency=0.05)
    data = write_jsonl(tmp_path / "data.jsonl", rows(30))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, prices=PRICES,
                          model={"name": "gpt-4o-mini", "max_tokens": 20})
    workers(config, concurrency=8)
    estimate = json.loads(cli("estimate", str(data), "-c", str(config), "-o", str(out), "--json").stdout)
    assert estimate["flex_cost_high"] == pytest.approx(estimate["cost_high"] / 2)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out), "--lane", "flex",
               "--output-format", "batch").returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    lines = read_jsonl(out)
    assert [line["custom_id"] for line in lines] == [str(i) for i in range(30)]
    tiers = {line["custom_id"]: line["response"]["body"]["service_tier"] for line in lines}
    refused = sim.stats()["faults"]["flex_unavailable"]
    assert 0 < refused < 30 and list(tiers.values()).count("default") == refused  # each fell back once
    sent = sim.received()
    assert sum(r.get("service_tier") == "flex" for r in sent) == 30 and len(sent) == 30 + refused
    expected = sum((line["response"]["body"]["usage"]["prompt_tokens"] * 100
                    + line["response"]["body"]["usage"]["completion_tokens"] * 200) / 1e6
                   * (0.5 if tiers[line["custom_id"]] == "flex" else 1.0) for line in lines)
    spend = json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)["jobs"][0]["spend"]
    assert spend["cost"] == pytest.approx(expected, abs=1e-8) and spend["calls"] == 30


@pytest.mark.slow
def test_flex_only_waits_for_capacity_instead_of_falling_back(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(flex_unavailable_rate=0.5)
    data = write_jsonl(tmp_path / "data.jsonl", rows(8))
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, lane="flex", flex_fallback=False,
                          max_retries=0, model={"name": "gpt-4o-mini", "max_tokens": 20})
    workers(config, concurrency=8)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    assert all(v is not None for line in read_jsonl(out) for v in line.values())  # no attempt was used up
    assert sim.stats()["faults"]["flex_unavailable"] > 0
    assert all(r.get("service_tier") == "flex" for r in sim.received())
