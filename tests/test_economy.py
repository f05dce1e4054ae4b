"""Money: prices, what a run will cost (``estimate``), what it costs while it runs, and a budget
the whole fleet obeys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from conftest import cli, read_jsonl, write_config, write_jsonl

from opt_queue.core.config import Config
from opt_queue.jobflow.estimate import estimate
from opt_queue.store.jobs import Job, job_id_for
from opt_queue.core.prices import Price, Prices, Usage, dollars, nano
from opt_queue.sim.api import SimServer

# one token = one hundredth of a cent in, two hundredths out: costs are easy to read
PRICES = {"gpt-4o-mini": {"input": 100.0, "cached_input": 50.0, "output": 200.0}}


def english_rows(n: int, start: int = 0) -> list[dict]:  # type: ignore[type-arg]
    return [{"index": str(i), "instruction": "Translate to French",
             "input": f"Row {i}: the committee will publish its findings next spring, after the review."}
            for i in range(start, start + n)]


def test_prices_come_from_the_table_unless_the_config_says_otherwise() -> None:
    prices = Prices({"my-model": {"input": 1.0, "output": 2.0}})
    table = prices.price("gpt-4o-mini")
    assert table is not None and (table.input, table.output, table.cached_input) == (0.15, 0.6, 0.075)
    assert prices.price("my-model") == Price(1.0, 2.0, None, source="config")
    assert prices.price("no-such-model-anywhere") is None
    assert Prices({"gpt-4o-mini": {"input": 9.0, "output": 9.0}}).price("gpt-4o-mini").input == 9.0  # type: ignore[union-attr]
    # cached input at its price, reasoning inside the output tokens, flex at half price, moderations free
    assert prices.cost("my-model", "/v1/chat/completions", {}, 1000, 500, cached=400) == pytest.approx(
        (600 * 1.0 + 400 * 1.0 + 500 * 2.0) / 1e6)
    assert table.cost(1_000_000, 1_000_000, cached=1_000_000) == pytest.approx(0.075 + 0.6)
    assert prices.cost("my-model", "/v1/chat/completions", {"service_tier": "flex"}, 1000, 0) == pytest.approx(0.0005)
    assert prices.cost("omni-moderation-latest", "/v1/moderations", {}, 1000, 0) == 0.0
    assert prices.cost("unknown-model", "/v1/chat/completions", {}, 10, 10) is None
    assert nano(1e-9 / 3) == 1 and dollars(nano(1.25)) == 1.25  # rounded up, never down
    assert Usage(10, 4, 5, 2, None).counters()["unpriced_calls"] == 1


def test_estimate_counts_only_what_a_rerun_sends_and_names_the_binding_limit(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", english_rows(100))
    out = tmp_path / "out.jsonl"
    out.write_text("".join(json.dumps({str(i): "done" if i % 2 else None}) + "\n" for i in range(20)))
    cfg = Config.model_validate({"api_keys": ["sk-a" * 6, "sk-b" * 6], "prices": PRICES,
                                 "model": {"name": "gpt-4o-mini", "max_tokens": 40},
                                 "limits": {"rpm": 60, "tpm": 1_000_000}})
    est = estimate(data, out, cfg)
    assert (est.rows_in_input, est.already_answered, est.rows_to_send, est.nulls_to_retry) == (100, 10, 90, 10)
    m = est.models["gpt-4o-mini"]
    assert m.cap_tokens == 90 * 40 and m.assumed_tokens == m.cap_tokens
    assert m.cost_low == pytest.approx(m.prompt_tokens * 100 / 1e6)
    assert m.cost_high == pytest.approx((m.prompt_tokens * 100 + 90 * 40 * 200) / 1e6)
    assert (m.binding, m.keys) == ("RPM", 2) and m.eta_s == pytest.approx(90 / 2)  # 90 rows at 2 x 60/min
    tokens_bound = estimate(data, out, cfg.model_copy(update={"limits": Config.model_validate(
        {"limits": {"rpm": 10_000, "tpm": 1000}}).limits}), output_tokens=10)
    m = tokens_bound.models["gpt-4o-mini"]
    assert m.binding == "TPM" and m.assumed_tokens == 90 * 10
    assert m.cost_low < m.cost_expected < m.cost_high  # type: ignore[operator]


@pytest.mark.slow
def test_estimate_calls_nothing_and_counts_what_the_api_counts_and_bills(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(usage_count="o200k")  # the API bills what OpenAI's tokenizer counts (its own implementation)
    rows = english_rows(30) + [{"index": f"zh{i}", "instruction": "翻译成英文", "input": f"第 {i} 行：委员会将在明年春天公布调查结果。"}
                               for i in range(10)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, prices=PRICES,
                          model={"name": "gpt-4o-mini", "max_tokens": 30})
    done = cli("estimate", str(data), "-c", str(config), "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    est = json.loads(done.stdout)
    assert sim.stats()["calls"] == 0 and est["rows_to_send"] == 40
    assert "no call" not in done.stderr

    workers(config, concurrency=8)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out), "--output-format", "full").returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    usages = [v["usage"] for line in read_jsonl(out) for v in line.values()]
    real_prompt = sum(u["prompt_tokens"] for u in usages)
    assert abs(est["prompt_tokens"] - real_prompt) / real_prompt <= 0.02, (est["prompt_tokens"], real_prompt)
    assert sim.stats()["prompt_tokens_billed"] == real_prompt
    real_output = sum(u["completion_tokens"] for u in usages)
    assert est["cost_low"] <= (real_prompt * 100 + real_output * 200) / 1e6 <= est["cost_high"]

    # What the run cost, as status says it: every call's usage at the table's prices.
    snap = json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)
    spend = snap["jobs"][0]["spend"]
    assert (spend["input_tokens"], spend["output_tokens"], spend["calls"]) == (real_prompt, real_output, 40)
    assert spend["cost"] == pytest.approx((real_prompt * 100 + real_output * 200) / 1e6, abs=1e-8)
    assert sum(k["spend"]["cost"] for k in snap["keys"]) == pytest.approx(spend["cost"], abs=1e-8)


@pytest.mark.slow
def test_cached_and_reasoning_tokens_are_counted_as_billed(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(cache_min_tokens=1)  # a prompt seen before reports cached tokens, however short
    prices = {"o3-mini": {"input": 100.0, "cached_input": 25.0, "output": 400.0}}
    long_text = "Summarise the quarterly report. " * 40
    rows = [{"index": str(i), "messages": [{"role": "user", "content": long_text}]} for i in range(4)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, prices=prices,
                          model={"name": "o3-mini", "max_tokens": 200}, concurrency=1,
                          dedupe=False)  # the same prompt four times: the API sees it cached
    workers(config, concurrency=1)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out), "--output-format", "full").returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    usages = [v["usage"] for line in read_jsonl(out) for v in line.values()]
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    reasoning = sum(u["completion_tokens_details"]["reasoning_tokens"] for u in usages)
    assert cached > 0 and reasoning > 0  # the simulated API reports both
    expected = sum(((u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]) * 100
                    + u["prompt_tokens_details"]["cached_tokens"] * 25 + u["completion_tokens"] * 400) / 1e6
                   for u in usages)
    snap = json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)
    spend = snap["jobs"][0]["spend"]
    assert (spend["cached_tokens"], spend["reasoning_tokens"]) == (cached, reasoning)
    assert spend["cost"] == pytest.approx(expected, abs=1e-8)


@pytest.mark.slow
def test_a_budget_pauses_the_fleet_and_a_higher_one_finishes_the_job(
        tmp_path: Path, sim: SimServer, redis_url: str, rclient: redis.Redis, workers) -> None:  # type: ignore[no-untyped-def]
    sim.configure(latency=0.05)
    rows = english_rows(60)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    base = {"broker_url": redis_url, "prices": PRICES, "model": {"name": "gpt-4o-mini", "max_tokens": 30}}
    worst = max(estimate(data, tmp_path / "none.jsonl", Config.model_validate(
        {"api_keys": ["sk-x" * 6], **base})).models["gpt-4o-mini"].cost_high / 60, 1e-9)  # type: ignore[operator]
    budget = round(worst * 30, 4)  # about half the rows at their worst case
    config = write_config(tmp_path / "config.json", sim, max_cost=budget, **base)
    workers(config, processes=3, concurrency=4)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    stopped = cli("collect", "-c", str(config), "-o", str(out), timeout=120)
    assert stopped.returncode == 4 and "budget reached: $" in stopped.stderr and f"of ${budget:.2f}" in stopped.stderr
    job = Job(rclient, job_id_for(out))
    meta = job.meta()
    spent = dollars(meta["spent_nano"])
    # Every admission reserved its worst case (prompt estimate + max_tokens), which the real cost
    # never exceeds here: the spend stays within the budget, in-flight bound 0.
    assert 0 < spent <= budget and int(meta["reserved_nano"]) == 0
    answered = {k for line in read_jsonl(out) for k, v in line.items() if v is not None}
    assert all(v is not None for line in read_jsonl(out) for v in line.values())  # no nulls: unanswered
    assert 20 <= len(answered) < 60, len(answered)
    assert sim.stats()["answered"] == len(answered) and sim.stats()["calls"] == len(answered)
    status = json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)["jobs"][0]
    assert status["status"] == "stopped" and status["reason"].startswith("budget reached")

    # A higher budget resumes: the rest is sent, every row once.
    config = write_config(tmp_path / "config.json", sim, max_cost=budget * 4, **base)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out), timeout=120).returncode == 0
    lines = read_jsonl(out)
    assert [next(iter(line)) for line in lines] == [r["index"] for r in rows]
    assert all(v is not None for line in lines for v in line.values())
    assert sorted(sim.stats()["per_prompt"].values()) == [1] * 60


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Read a /metrics endpoint with prometheus-client's own parser."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return sum(v for (n, ls), v in samples.items() if n == name and all((k, v2) in ls for k, v2 in labels.items()))


@pytest.mark.slow
def test_workers_and_collect_serve_prometheus_metrics(
        tmp_path: Path, sim: SimServer, redis_url: str) -> None:
    from conftest import kill_group, start_cli, wait_for

    from opt_queue.jobflow.local import free_port

    sim.configure(latency=0.3)
    rows = english_rows(24)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, prices=PRICES, max_cost=100.0,
                          model={"name": "gpt-4o-mini", "max_tokens": 20})
    worker_port, collect_port = free_port(), free_port()
    worker = start_cli("worker", "-c", str(config), "--concurrency", "4", "--metrics-port", str(worker_port),
                       log=tmp_path / "worker.log")
    try:
        wait_for(lambda: _up(worker_port), timeout=30, what="the worker's metrics endpoint")
        assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
        collector = start_cli("collect", "-c", str(config), "-o", str(out), "--metrics-port", str(collect_port),
                              log=tmp_path / "collect.log")
        seen: dict = {}

        def collect_reports_progress() -> bool:
            if _up(collect_port):
                seen.update(scrape(collect_port))
            return total(seen, "optq_job_rows", state="answered") >= 1
        wait_for(collect_reports_progress, timeout=60, what="collect's metrics to show answered rows")
        assert total(seen, "optq_job_budget_left_dollars") <= 100.0 and total(seen, "optq_job_cost_dollars_total") > 0
        assert total(seen, "optq_key_tokens_total") > 0  # counts that only grow are counters (*_total)
        assert total(seen, "optq_key_info", provider="openai") >= 1  # which provider each key speaks
        assert collector.wait(60) == 0
        samples = scrape(worker_port)
        assert total(samples, "optq_rows_total", outcome="answered") == 24
        assert total(samples, "optq_api_calls_total", status="200") == 24
        key = next(ls for (n, ls) in samples if n == "optq_tokens_total")
        assert dict(key)["key"].startswith("key-") and dict(key)["model"] == "gpt-4o-mini"
        spent = Job(redis.Redis.from_url(redis_url), job_id_for(out)).progress().spend
        assert total(samples, "optq_tokens_total", kind="input") == spent["input_tokens"]
        assert total(samples, "optq_cost_dollars_total") == pytest.approx(spent["cost"], abs=1e-6)
        assert "sk-" not in json.dumps([list(k) for k in samples])
    finally:
        kill_group(worker)


def _up(port: int) -> bool:
    try:
        scrape(port)
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_identical_requests_are_paid_once_and_every_copy_gets_the_answer(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    from opt_queue.sim.api import sim_answer

    rows = english_rows(95)
    # 5% repeat another row; the copies come first in the input, before the rows they repeat
    rows = [dict(rows[i * 7], index=f"again-{i}") for i in range(4)] + rows
    rows.append({"index": "refused-again", "instruction": "", "input": "REFUSE this"})
    rows.insert(10, {"index": "refused", "instruction": "", "input": "REFUSE this"})
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, prices=PRICES,
                          model={"name": "gpt-4o-mini", "max_tokens": 30, "temperature": 0})
    workers(config, processes=2, concurrency=8)
    submitted = cli("submit", str(data), "-c", str(config), "-o", str(out), "--output-format", "full")
    assert submitted.returncode == 0 and "5 rows repeat another row's request" in submitted.stdout
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    assert set(sim.stats()["per_prompt"].values()) == {1}  # every distinct request paid once
    assert sim.stats()["calls"] == 96
    got = {k: v for line in read_jsonl(out) for k, v in line.items()}
    assert list(got) == [r["index"] for r in rows]
    for r in rows:
        if "REFUSE" in r["input"]:
            continue
        messages = [{"role": "system", "content": r["instruction"]}, {"role": "user", "content": r["input"]}]
        assert got[r["index"]]["text"] == sim_answer("gpt-4o-mini", messages)
    # the first row with a request is sent, the later ones are its copies, whatever their names
    assert {str(i * 7): got[str(i * 7)]["copy_of"] for i in range(4)} == {str(i * 7): f"again-{i}" for i in range(4)}
    assert "copy_of" not in got["again-0"] and got["refused"] is None and got["refused-again"] is None
    errors = {e["index"]: e for e in read_jsonl(tmp_path / "output.errors.jsonl")}
    assert errors["refused-again"]["copy_of"] == "refused" and errors["refused-again"]["error_type"] == "refusal"
    spend = json.loads(cli("status", "-c", str(config), "-o", str(out), "--json").stdout)["jobs"][0]["spend"]
    assert spend["calls"] == 96  # the copies cost nothing


@pytest.mark.slow
def test_dedupe_off_pays_for_every_row(tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    rows = english_rows(6) + [dict(english_rows(1)[0], index="again")]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    out = tmp_path / "output.jsonl"
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, dedupe=False)
    workers(config, concurrency=4)
    assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
    assert sim.stats()["calls"] == 7 and sorted(sim.stats()["per_prompt"].values()) == [1] * 5 + [2]


@pytest.mark.slow
def test_repeated_requests_that_sample_are_each_sent_unless_dedupe_is_true(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    rows = [dict(english_rows(1)[0], index=f"again-{i}") for i in range(3)] + english_rows(4)
    data = write_jsonl(tmp_path / "data.jsonl", rows)  # row 0's request four times, copies first
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url)  # temperature unset
    workers(config, concurrency=4)
    estimated = cli("estimate", str(data), "-c", str(config), "-o", str(tmp_path / "out.jsonl"))
    assert "3 rows repeat another row's request and are each sent" in estimated.stdout, estimated.stdout
    submitted = cli("submit", str(data), "-c", str(config), "-o", str(tmp_path / "out.jsonl"))
    assert "3 rows repeat another row's request and are each sent" in submitted.stdout, submitted.stdout
    assert cli("collect", "-c", str(config), "-o", str(tmp_path / "out.jsonl")).returncode == 0
    assert sim.stats()["calls"] == 7 and sorted(sim.stats()["per_prompt"].values()) == [1, 1, 1, 4]

    sim.reset_stats()
    always = write_config(tmp_path / "always.json", sim, broker_url=redis_url, dedupe=True)
    estimated = cli("estimate", str(data), "-c", str(always), "-o", str(tmp_path / "out2.jsonl"))
    assert "3 rows repeat another row's request and get its answer, unpaid" in estimated.stdout
    assert cli("submit", str(data), "-c", str(always), "-o", str(tmp_path / "out2.jsonl")).returncode == 0
    assert cli("collect", "-c", str(always), "-o", str(tmp_path / "out2.jsonl")).returncode == 0
    assert sim.stats()["calls"] == 4


@pytest.mark.slow
def test_the_response_cache_answers_a_second_job_without_calls(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    rows = english_rows(12)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, prices=PRICES,
                          cache={"ttl": "1h"}, model={"name": "gpt-4o-mini", "max_tokens": 30})
    workers(config, concurrency=8)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert cli("submit", str(data), "-c", str(config), "-o", str(first)).returncode == 0
    assert cli("collect", "-c", str(config), "-o", str(first)).returncode == 0
    assert sim.stats()["calls"] == 12
    assert cli("submit", str(data), "-c", str(config), "-o", str(second), "--output-format", "full").returncode == 0
    done = cli("collect", "-c", str(config), "-o", str(second))
    assert done.returncode == 0 and "the response cache answered 12 rows" in done.stdout
    assert sim.stats()["calls"] == 12  # no call for the second job
    answers = {k: v for line in read_jsonl(first) for k, v in line.items()}
    again = {k: v for line in read_jsonl(second) for k, v in line.items()}
    assert {k: v["text"] for k, v in again.items()} == answers and all(v["from_cache"] for v in again.values())
    spend = json.loads(cli("status", "-c", str(config), "-o", str(second), "--json").stdout)["jobs"][0]["spend"]
    assert spend["calls"] == 0 and spend["cost"] == 0 and spend["cache_hits"] == 12 and spend["cache_saved"] > 0


def test_estimate_lists_rows_too_long_for_the_context_and_probes_limits_for_the_eta(
        tmp_path: Path, sim: SimServer) -> None:
    from conftest import TEST_KEY

    from opt_queue.sim.api import SimKey

    sim.configure(keys=[SimKey(TEST_KEY, rpm=600, tpm=60_000)])
    rows = english_rows(6) + [{"index": "long", "instruction": "Summarize", "input": "word " * 3000}]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    config = write_config(tmp_path / "config.json", sim, prices=PRICES, context_window={"gpt-4o-mini": 2000},
                          model={"name": "gpt-4o-mini", "max_tokens": 100})
    out = tmp_path / "output.jsonl"
    plain = cli("estimate", str(data), "-c", str(config), "-o", str(out))
    assert plain.returncode == 0, plain.stderr
    assert "1 rows do not fit gpt-4o-mini's context window of 2000 tokens" in plain.stdout
    assert "ETA unknown" in plain.stdout and "--probe" in plain.stdout and sim.stats()["calls"] == 0
    probed = cli("estimate", str(data), "-c", str(config), "-o", str(out), "--probe", "--json")
    assert probed.returncode == 0, probed.stderr
    est = json.loads(probed.stdout)
    m = est["models"]["gpt-4o-mini"]
    assert [r["index"] for r in m["too_long_rows"]] == ["long"] and m["too_long_rows"][0]["prompt_tokens"] > 2000
    assert sim.stats()["calls"] == 1  # one key, one minimal call
    assert m["limits_source"] == "probe" and m["binding"] == "TPM"
    tokens = m["prompt_tokens"] + m["cap_tokens"]
    assert est["eta_s"] == pytest.approx(tokens / (60_000 / 60.0), rel=0.01)  # the headers' minute (60 s)
    assert m["probe_cost"] == pytest.approx((sim.stats()["prompt_tokens_billed"] * 100 + 1 * 200) / 1e6)  # max_tokens 1
    assert TEST_KEY not in probed.stdout + probed.stderr
