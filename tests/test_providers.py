"""Providers beside OpenAI: a key names its provider, a row's model picks the keys that serve it,
and each provider's requests, answers, errors and rate-limit headers are mapped to the engine's
terms. Pure functions here; the jobs that mix providers through real workers are at the end."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest
from conftest import TEST_KEY, cli, read_jsonl, write_config, write_jsonl

from opt_queue.core import answers
from opt_queue.core.config import Config, fingerprint, provider_of
from opt_queue.core.prices import Prices
from opt_queue import providers
from opt_queue.providers import Kind
from opt_queue.providers import anthropic as claude
from opt_queue.providers import gemini
from opt_queue.sim.api import SimKey, SimServer, sim_answer

ANT_KEY = "sk-ant-api03-test-0123456789abcdefghijklmnopqrstuv"
GEM_KEYS = ("AIzaSyTest-0123456789abcdefghijklmnopqrst", "AIzaSyTest-second-key-0123456789abcdefghij")
CLAUDE = "claude-haiku-4-5"
GEMINI = "gemini-2.5-flash"


# -- configuration: which keys serve which rows ---------------------------------------------------
def test_a_rows_model_picks_its_provider_by_name_or_by_a_keys_models() -> None:
    assert [provider_of(m) for m in ("gpt-4o-mini", "claude-sonnet-4-5", "gemini-2.5-flash",
                                     "models/gemini-2.0-flash", "o3-mini", "llama-3.1-8b")] == \
        ["openai", "anthropic", "gemini", "gemini", "openai", "openai"]
    cfg = Config.model_validate({"api_keys": [
        "sk-a", {"key": ANT_KEY, "provider": "anthropic"},
        {"key": "sk-gw", "models": ["claude-via-gateway"]}]})
    openai_key, ant, gateway = cfg.keys()
    assert (ant.provider, ant.api_base) == ("anthropic", "https://api.anthropic.com")
    assert openai_key.serves("gpt-4o") and not openai_key.serves(CLAUDE)  # an Anthropic key exists
    assert ant.serves(CLAUDE) and not ant.serves("gpt-4o") and not ant.serves("gemini-2.5-pro")
    assert gateway.serves("claude-via-gateway") and not gateway.serves("gpt-4o")  # its list decides
    # the seed's config (OpenAI keys only) keeps serving every model, a gateway's claude-* included
    seed = Config.model_validate({"api_keys": ["sk-a"], "api_base": "https://gateway.example/v1"}).keys()[0]
    assert seed.serves(CLAUDE) and seed.serves("gemini-2.5-flash") and seed.api_base == "https://gateway.example/v1"


@pytest.mark.parametrize("keys, field", [
    ([{"key": "a", "provider": "anthropic", "group": "g"}, {"key": "b", "group": "g"}], "group 'g' holds keys of"),
    ([{"key": "a", "provider": "anthropic", "azure": {"endpoint": "https://x.openai.azure.com",
                                                      "api_version": "2024-10-21"}}], "azure"),
    ([{"key": "a", "provider": "claude"}], "provider"),
])
def test_a_key_config_that_cannot_work_is_refused_naming_its_field(keys: list, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Config.model_validate({"api_keys": keys}).keys()


# -- Anthropic: the request ---------------------------------------------------------------------
def test_a_chat_row_becomes_a_native_messages_request() -> None:
    body = {"model": CLAUDE, "temperature": 0.2, "top_p": 0.9, "stop": "END", "seed": 7, "service_tier": "flex",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                                             {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"q": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "a cat"}],
            "tools": [{"type": "function", "function": {"name": "look", "description": "Look it up",
                                                        "parameters": {"type": "object"}}}],
            "tool_choice": "required"}
    native = claude.to_messages(body)
    assert native == {
        "model": CLAUDE, "max_tokens": claude.DEFAULT_MAX_TOKENS, "system": "Be brief.\n\nAnswer in English.",
        "temperature": 0.2, "top_p": 0.9, "stop_sequences": ["END"],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "call_1", "name": "look", "input": {"q": 1}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "a cat"}]}],
        "tools": [{"name": "look", "input_schema": {"type": "object"}, "description": "Look it up"}],
        "tool_choice": {"type": "any"}}
    assert claude.to_messages({"model": CLAUDE, "max_completion_tokens": 30, "messages": []})["max_tokens"] == 30
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert claude.to_messages({"model": CLAUDE, "messages": [], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})["output_config"] == \
        {"format": {"type": "json_schema", "schema": schema}}


@pytest.mark.parametrize("extra, said", [({"n": 2}, "n > 1"), ({"logprobs": True}, "logprobs"),
                                         ({"functions": []}, "functions: not a parameter")])
def test_a_parameter_with_no_messages_equivalent_stops_the_job_by_name(extra: dict, said: str) -> None:
    with pytest.raises(claude.NotMappable, match=said) as got:
        claude.to_messages({"model": CLAUDE, "messages": [{"role": "user", "content": "x"}], **extra})
    assert claude.classify(got.value).kind is Kind.JOB_CONFIG


# -- Anthropic: the answer ----------------------------------------------------------------------
def _message(content: list, stop: str = "end_turn", **usage: int) -> dict:
    return {"id": "msg_1", "type": "message", "role": "assistant", "model": CLAUDE, "content": content,
            "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": 20, "output_tokens": 7, **usage}}


def test_a_messages_answer_reads_like_an_openai_one() -> None:
    reply = answers.read("/v1/chat/completions", _message(
        [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": " Hello "}, {"type": "text", "text": "there"}],
        cache_read_input_tokens=100, cache_creation_input_tokens=30))
    assert (reply.value, reply.finish_reason) == ("Hello there", "stop")
    assert (reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens) == (150, 100, 7)
    assert reply.full()["native"]["id"] == "msg_1" and reply.full()["finish_reason"] == "stop"
    assert answers.read("/v1/chat/completions", _message([{"type": "text", "text": "cut"}], "max_tokens")).finish_reason \
        == "length"
    tool = answers.read("/v1/chat/completions", _message(
        [{"type": "tool_use", "id": "toolu_1", "name": "look", "input": {"q": "猫"}}], "tool_use"))
    assert tool.finish_reason == "tool_calls"
    assert tool.tool_calls == [{"id": "toolu_1", "type": "function",
                                "function": {"name": "look", "arguments": '{"q": "猫"}'}}]
    assert json.loads(tool.value) == tool.tool_calls
    with pytest.raises(answers.Refused) as refused:
        answers.read("/v1/chat/completions", _message([], "refusal"))
    assert refused.value.usage["prompt_tokens"] == 20  # a refusal is billed
    with pytest.raises(answers.BadResponse):
        answers.read("/v1/chat/completions", _message([], "end_turn"))


# -- Anthropic: errors and headers --------------------------------------------------------------
def _error(kind: str, message: str) -> dict:
    return {"type": "error", "error": {"type": kind, "message": message}}


def test_anthropics_errors_map_to_the_error_policy() -> None:
    headers = {"retry-after": "7", "anthropic-ratelimit-requests-limit": "50",
               "anthropic-ratelimit-input-tokens-limit": "30000"}
    tokens = claude.classify_status(429, _error("rate_limit_error", "This request would exceed the rate limit "
                                                "for your organization of 30,000 input tokens per minute."), headers)
    assert (tokens.kind, tokens.retry_after, tokens.tokens, tokens.server_limits) == \
        (Kind.RATE_LIMITED, 7.0, True, {"requests": 50, "tokens": 30000})  # no output limit stated here
    requests = claude.classify_status(429, _error("rate_limit_error", "... of 50 requests per minute."), {})
    assert requests.kind is Kind.RATE_LIMITED and not requests.tokens
    cases = {(529, "overloaded_error", "Overloaded"): Kind.SLOW_DOWN,
             (401, "authentication_error", "invalid x-api-key"): Kind.KEY_DEAD,
             (403, "permission_error", "no access"): Kind.KEY_DEAD,
             (400, "invalid_request_error", "Your credit balance is too low to access the Anthropic API."): Kind.KEY_DEAD,
             (400, "invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"): Kind.TOO_LONG,
             (404, "not_found_error", "model: claude-nope"): Kind.JOB_CONFIG,
             (413, "request_too_large", "Request exceeds the maximum allowed number of bytes."): Kind.BAD_ROW,
             (400, "invalid_request_error", "messages.0.content: empty"): Kind.BAD_ROW,
             (500, "api_error", "Internal server error"): Kind.TRANSIENT}
    for (status, kind, message), expected in cases.items():
        assert claude.classify_status(status, _error(kind, message), {}).kind is expected, (status, kind)


def test_the_limits_come_from_the_anthropic_ratelimit_headers() -> None:
    headers = {"anthropic-ratelimit-requests-limit": "4000", "anthropic-ratelimit-requests-remaining": "3999",
               "anthropic-ratelimit-input-tokens-limit": "400000",
               "anthropic-ratelimit-input-tokens-remaining": "399000",
               "anthropic-ratelimit-input-tokens-reset": "2026-12-03T19:00:00Z",
               "anthropic-ratelimit-output-tokens-limit": "80000"}
    assert claude.server_limits(headers) == {"requests": 4000, "tokens": 400000, "output_tokens": 80000}
    assert claude.token_window(headers) == (400000, 399000)
    assert claude.token_window({"anthropic-ratelimit-input-tokens-limit": "x"}) is None
    assert claude.server_limits({}) == {}


# -- Gemini: the request, the answer, the errors ----------------------------------------------
def test_a_chat_row_becomes_a_native_generate_content_request() -> None:
    body = {"model": GEMINI, "temperature": 0.1, "top_p": 0.5, "seed": 3, "stop": ["END"], "n": 2,
            "max_tokens": 64, "user": "u1", "service_tier": "flex",
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}},
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                                             {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}]},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "look", "arguments": '{"q": 1}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "a cat"}],
            "tools": [{"type": "function", "function": {"name": "look", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "look"}}}
    assert gemini.to_gemini(body) == {
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "contents": [
            {"role": "user", "parts": [{"text": "What is this?"},
                                       {"inlineData": {"mimeType": "image/png", "data": "iVBO"}},
                                       {"fileData": {"mimeType": "image/png", "fileUri": "https://x.test/a.png"}}]},
            {"role": "model", "parts": [{"functionCall": {"name": "look", "args": {"q": 1}}}]},
            {"role": "user", "parts": [{"functionResponse": {"name": "look", "response": {"content": "a cat"}}}]}],
        "generationConfig": {"temperature": 0.1, "topP": 0.5, "seed": 3, "maxOutputTokens": 64,
                             "stopSequences": ["END"], "candidateCount": 2, "responseMimeType": "application/json",
                             "responseJsonSchema": {"type": "object"}},
        "tools": [{"functionDeclarations": [{"name": "look", "parameters": {"type": "object"}}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["look"]}}}
    config = gemini.sdk_config(gemini.to_gemini(body))  # what the SDK is handed: the same, flattened
    assert (config.max_output_tokens, config.candidate_count, config.should_return_http_response) == (64, 2, True)
    assert config.system_instruction.parts[0].text == "Be brief."
    with pytest.raises(gemini.NotMappable, match="functions"):
        gemini.to_gemini({"model": GEMINI, "messages": [], "functions": []})


def _candidate(parts: list, finish: str = "STOP") -> dict:
    return {"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}


def test_a_generate_content_answer_reads_like_an_openai_one() -> None:
    usage = {"promptTokenCount": 30, "cachedContentTokenCount": 10, "candidatesTokenCount": 5,
             "thoughtsTokenCount": 12, "totalTokenCount": 47}
    reply = answers.read("/v1/chat/completions", {
        "candidates": [_candidate([{"text": "plan", "thought": True}, {"text": " Hello "}]), _candidate([{"text": "B"}])],
        "usageMetadata": usage, "responseId": "r1"})
    assert (reply.value, reply.finish_reason, reply.extra["choices"]) == ("Hello", "stop", ["Hello", "B"])
    assert (reply.prompt_tokens, reply.cached_tokens, reply.completion_tokens, reply.reasoning_tokens) == (30, 10, 17, 12)
    assert reply.full()["native"]["responseId"] == "r1"
    cut = answers.read("/v1/chat/completions", {"candidates": [_candidate([{"text": "cu"}], "MAX_TOKENS")]})
    assert cut.finish_reason == "length"
    call = answers.read("/v1/chat/completions", {"candidates": [_candidate([{"functionCall": {"name": "f", "args": {"a": 1}}}])]})
    assert call.finish_reason == "tool_calls" and json.loads(call.tool_calls[0]["function"]["arguments"]) == {"a": 1}
    with pytest.raises(answers.ContentFiltered, match="blocked .SAFETY") as blocked:
        answers.read("/v1/chat/completions", {"promptFeedback": {"blockReason": "SAFETY"},
                                              "usageMetadata": {"promptTokenCount": 9}})
    assert blocked.value.usage["prompt_tokens"] == 9  # a blocked prompt is billed
    with pytest.raises(answers.ContentFiltered, match="RECITATION"):
        answers.read("/v1/chat/completions", {"candidates": [{"finishReason": "RECITATION", "index": 0}]})


def _exhausted(quota: str, value: str, delay: str | None = "43s") -> dict:
    details = [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaId": quota, "quotaValue": value}]}]
    if delay:
        details.append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay})
    return {"error": {"code": 429, "message": "You exceeded your current quota", "status": "RESOURCE_EXHAUSTED",
                      "details": details}}


def test_geminis_quota_errors_say_what_to_wait_and_learn() -> None:
    minute = gemini.classify_status(429, _exhausted("GenerateRequestsPerMinutePerProjectPerModel", "15"))
    assert (minute.kind, minute.retry_after, minute.server_limits, minute.tokens) == \
        (Kind.RATE_LIMITED, 43.0, {"requests": 15}, False)
    tokens = gemini.classify_status(429, _exhausted("GenerateContentInputTokensPerModelPerMinute-FreeTier", "250000", "0.5s"))
    assert (tokens.retry_after, tokens.server_limits, tokens.tokens) == (0.5, {"tokens": 250000}, True)
    day = gemini.classify_status(429, _exhausted("GenerateRequestsPerDayPerProjectPerModel", "1000", None))
    assert day.kind is Kind.RATE_LIMITED and day.server_limits == {} and day.retry_after == 60.0
    assert gemini.classify_status(429, _exhausted("GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "0")).kind \
        is Kind.KEY_DEAD  # no quota at all for this model on this project
    invalid = {"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT", "details": [
        {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}]}}
    cases = [(400, invalid, Kind.KEY_DEAD),
             (403, {"error": {"status": "PERMISSION_DENIED", "message": "denied"}}, Kind.KEY_DEAD),
             (400, {"error": {"status": "FAILED_PRECONDITION", "message": "User location is not supported"}}, Kind.KEY_DEAD),
             (400, {"error": {"status": "INVALID_ARGUMENT", "message": "The input token count (2000000) exceeds "
                                                                        "the maximum number of tokens allowed (1048576)."}},
              Kind.TOO_LONG),
             (400, {"error": {"status": "INVALID_ARGUMENT", "message": "bad part"}}, Kind.BAD_ROW),
             (404, {"error": {"status": "NOT_FOUND", "message": "models/x is not found"}}, Kind.JOB_CONFIG),
             (503, {"error": {"status": "UNAVAILABLE", "message": "The model is overloaded."}}, Kind.SLOW_DOWN),
             (500, {"error": {"status": "INTERNAL", "message": "internal"}}, Kind.TRANSIENT)]
    for status, body, expected in cases:
        assert gemini.classify_status(status, body).kind is expected, body


# -- money ----------------------------------------------------------------------------------------
def test_claude_and_gemini_calls_cost_what_their_providers_bill() -> None:
    prices = Prices()
    haiku = prices.price(CLAUDE)
    assert haiku is not None and haiku.source == "genai-prices (anthropic)" and haiku.cache_write == 1.25
    # 10,000 prompt tokens: 6,000 read from the cache, 3,000 written to it, 1,000 plain; 500 out
    reply = answers.read("/v1/chat/completions", _message([{"type": "text", "text": "x"}], input_tokens=1000,
                                                          output_tokens=500, cache_read_input_tokens=6000,
                                                          cache_creation_input_tokens=3000))
    usage = prices.usage(CLAUDE, "/v1/chat/completions", {}, reply)
    assert usage.cost == pytest.approx((1000 * 1.0 + 6000 * 0.1 + 3000 * 1.25 + 500 * 5.0) / 1e6)
    pro = "gemini-2.5-pro"  # a prompt over 200,000 tokens pays the long-prompt rates on the whole call
    assert prices.cost(pro, "/v1/chat/completions", {}, 100_000, 1000) == pytest.approx((100_000 * 1.25 + 1000 * 10) / 1e6)
    assert prices.cost(pro, "/v1/chat/completions", {}, 300_000, 1000) == pytest.approx((300_000 * 2.5 + 1000 * 15) / 1e6)


# -- real workers against the simulated API -----------------------------------------------------
def _mixed_rows(n: int) -> list[dict]:
    """Rows of the job's model (OpenAI's), of a claude model and of a gemini model, in turn."""
    rows = []
    for i in range(n):
        question = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": f"第 {i} 行: what is {i} squared?"}]
        if i % 3 == 1:
            rows.append({"index": str(i), "model": CLAUDE, "messages": question})
        elif i % 3 == 2:
            rows.append({"index": str(i), "model": GEMINI, "messages": question})
        else:  # the job's model (an OpenAI one)
            rows.append({"index": str(i), "messages": [{"role": "user", "content": f"第 {i} 行 ✓"}]})
    return rows


def _three_providers_config(path: Path, sim: SimServer, **fields: object) -> Path:
    base = sim.base_url.removesuffix("/v1")  # Anthropic's and Gemini's SDKs add their version path
    return write_config(path, sim, api_keys=[
        TEST_KEY, {"key": ANT_KEY, "provider": "anthropic", "api_base": base},
        *({"key": k, "provider": "gemini", "group": "proj", "api_base": base} for k in GEM_KEYS)],
        groups={"proj": {"limits": {"requests": ["6/2s"]}}},  # a Gemini project: typed (no headers)
        model={"name": "gpt-4o-mini", "max_tokens": 40}, **fields)


def test_a_refusal_or_a_block_fails_the_call_with_its_reason_and_keeps_what_was_billed(sim: SimServer) -> None:
    sim.configure(keys=[SimKey(ANT_KEY), SimKey(GEM_KEYS[0])])
    base = sim.base_url.removesuffix("/v1")
    cfg = Config.model_validate({"api_keys": [{"key": ANT_KEY, "provider": "anthropic", "api_base": base},
                                              {"key": GEM_KEYS[0], "provider": "gemini", "api_base": base}]})
    ant, gem = cfg.keys()

    async def go() -> list:
        api = providers.for_config(cfg)
        got = []
        try:
            for key, model, said in ((ant, CLAUDE, "REFUSE this"), (gem, GEMINI, "REFUSE this"),
                                     (gem, GEMINI, "UNSAFE prompt")):
                try:
                    await api.call(key, "/v1/chat/completions",
                                   {"model": model, "messages": [{"role": "user", "content": said}]}, 10)
                except providers.CallFailed as exc:
                    got.append((exc.failure.kind, exc.failure.code, exc.usage["prompt_tokens"] > 0))
        finally:
            await api.close()
        return got

    assert asyncio.run(go()) == [(Kind.BAD_ROW, "refusal", True), (Kind.BAD_ROW, "content_filter", True),
                                 (Kind.BAD_ROW, "content_filter", True)]


def test_one_job_mixes_three_providers_each_row_answered_by_its_own_within_its_limits(
        tmp_path: Path, sim: SimServer) -> None:
    # Anthropic's three windows bind, learned from its headers (no limits typed): requests, input
    # tokens, and output tokens, which the server charges as max_tokens (40) on arrival and adjusts
    # to the output at the end (a row writes ~10): two rows in flight fill it. The Gemini project's two keys share
    # one budget of 6 requests a minute (typed in the config, enforced by the API per project).
    # Every third call of each meets 529 overloaded (Anthropic) or 503 overloaded (Gemini): a
    # slow-down that uses no attempt (max_retries 0: a used attempt would leave a null)
    sim.configure(keys=[SimKey(TEST_KEY), SimKey(ANT_KEY, rpm=8, tpm=120, otpm=100),
                        *(SimKey(k, rpm=6, org="proj") for k in GEM_KEYS)],
                  latency=0.05, minute=2, anthropic_token_rounding=1, overloaded_every=3)
    data = write_jsonl(tmp_path / "data.jsonl", _mixed_rows(18))
    out = tmp_path / "output.jsonl"
    config = _three_providers_config(tmp_path / "config.json", sim, max_retries=0)
    result = cli("run", str(data), "-c", str(config), "-o", str(out), "--output-format", "full")
    assert result.returncode == 0, result.stderr
    lines = {k: v for line in read_jsonl(out) for k, v in line.items()}
    rows = {r["index"]: r for r in _mixed_rows(18)}
    assert len(lines) == 18
    for index, got in lines.items():
        row = rows[index]
        model = row.get("model", "gpt-4o-mini")
        assert got["text"] == sim_answer(model, row["messages"]), index
        if model == CLAUDE:  # answered through the Messages API, its native body kept
            assert got["native"]["type"] == "message" and got["finish_reason"] == "stop"
        elif model == GEMINI:
            assert "candidates" in got["native"] and got["finish_reason"] == "stop"
            assert got["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0  # thoughts
        else:
            assert "native" not in got
    stats = sim.stats()
    assert stats["rate_limited"] == 0, stats["refusals"]
    overloaded = stats["faults"].get("overloaded", 0)
    assert overloaded > 0
    received = sim.received()
    claude_calls = [r for r in received if r.get("_url") == "/v1/messages"]
    gemini_calls = [r for r in received if r.get("_url") == "generateContent"]
    assert len(claude_calls) + len(gemini_calls) == 12 + overloaded  # one call a row, and one per overload
    assert all(r["system"] == "Answer briefly." and r["max_tokens"] == 40 for r in claude_calls)
    assert all(r["systemInstruction"] == {"parts": [{"text": "Answer briefly."}]}
               and r["generationConfig"] == {"maxOutputTokens": 40} for r in gemini_calls)
    assert {fp for fp in stats["per_key"]} >= {fingerprint(k) for k in GEM_KEYS}  # the project's keys shared
    assert len(stats["per_prompt"]) == 18 and set(stats["per_prompt"].values()) == {1}  # nothing paid twice
    for secret in (ANT_KEY, *GEM_KEYS):
        assert secret not in result.stdout + result.stderr


def test_a_gemini_project_without_typed_limits_learns_them_from_its_first_resource_exhausted(
        tmp_path: Path, sim: SimServer) -> None:
    # two keys of one project, 4 requests per 2 s between them, no limits typed (the API sends no
    # headers): the first 429 names the quota and its value, the limiter learns it and honours the
    # RetryInfo delay; a 429 uses no attempt (max_retries 0: one used would leave a null)
    sim.configure(keys=[SimKey(k, rpm=4, org="proj") for k in GEM_KEYS], minute=2, latency=0.05)
    rows = [{"index": str(i), "model": GEMINI, "messages": [{"role": "user", "content": f"row {i}"}]}
            for i in range(12)]
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    base = sim.base_url.removesuffix("/v1")
    config = write_config(tmp_path / "config.json", sim, max_retries=0, api_keys=[
        {"key": k, "provider": "gemini", "group": "proj", "api_base": base} for k in GEM_KEYS])
    out = tmp_path / "output.jsonl"
    result = cli("run", str(data), "-c", str(config), "-o", str(out))
    assert result.returncode == 0, result.stderr
    got = {k: v for line in read_jsonl(out) for k, v in line.items()}
    assert got == {r["index"]: sim_answer(GEMINI, r["messages"]) for r in rows}
    stats = sim.stats()
    # the first burst, before any limit is known, meets 429s (at most the 8 rows past the 4 the
    # window takes); the limit learned from them holds from then on
    assert 1 <= stats["rate_limited"] <= 8, stats["refusals"]
    assert stats["calls"] == 12 + stats["rate_limited"]


@pytest.mark.slow
def test_anthropic_output_tokens_are_held_as_the_server_counts_them(
        tmp_path: Path, sim: SimServer, redis_url: str, workers) -> None:  # type: ignore[no-untyped-def]
    # Rows ask max_tokens 2000 and write ~10; the output window takes 6000 a (2 s) minute. A server
    # that holds max_tokens on arrival admits 3 at once; one that counts output as it is written
    # admits all while its window is not full. Anthropic's documentation has said both; its headers
    # tell which (remaining output tokens, rounded to thousands), unless they are stated after the
    # answer was counted, when a server of the first kind looks like one of the second: its 429s
    # refute that reading. max_retries 0: a 429 uses no attempt, so every row must end answered.
    # One key per server (each its own model: its own scope), one worker for the three jobs.
    cases = (("claude-haiku-4-5", "actual", "arrival"), ("claude-sonnet-4-5", "max_tokens", "arrival"),
             ("claude-opus-4-1", "max_tokens", "end"))
    secrets = [f"sk-ant-api03-output-{n}-0123456789abcdefghijklmnop" for n in range(3)]
    base = sim.base_url.removesuffix("/v1")
    sim.configure(keys=[SimKey(k, otpm=6000) for k in secrets], minute=2, latency=0.3)
    config = write_config(tmp_path / "config.json", sim, broker_url=redis_url, max_retries=0, api_keys=[
        {"key": k, "provider": "anthropic", "api_base": base, "models": [model]}
        for k, (model, _, _) in zip(secrets, cases)])
    workers(config)
    for secret, (model, counts, headers_at) in zip(secrets, cases):
        sim.configure(anthropic_output_count=counts, anthropic_headers_at=headers_at)
        sim.api.reset_stats()
        rows = [{"index": str(i), "model": model, "max_tokens": 2000,
                 "messages": [{"role": "user", "content": f"row {i}"}]} for i in range(12)]
        data = write_jsonl(tmp_path / f"{model}.jsonl", rows)
        out = tmp_path / f"out-{model}.jsonl"
        assert cli("submit", str(data), "-c", str(config), "-o", str(out)).returncode == 0
        assert cli("collect", "-c", str(config), "-o", str(out)).returncode == 0
        assert len([v for line in read_jsonl(out) for v in line.values() if v]) == 12
        scope = f"{fingerprint(secret)}/{model}"
        log = [line for line in (tmp_path / "worker.log").read_text().splitlines() if scope in line]
        written = sum("counts output tokens as they are written" in line for line in log)
        refuted = sum("holds max_tokens after all" in line for line in log)
        stats = sim.stats()
        if counts == "actual":  # more in flight than 6000 / 2000, and never refused
            assert (written, refuted) == (1, 0) and stats["rate_limited"] == 0 and stats["max_in_flight"] > 3
        elif headers_at == "arrival":  # held max_tokens throughout: at most 3 at once
            assert (written, refuted) == (0, 0) and stats["rate_limited"] == 0 and stats["max_in_flight"] <= 3
        else:  # read wrongly, refuted by the 429s of the requests admitted on that reading, and only those
            assert written == 1 and stats["rate_limited"] == refuted >= 1, stats["refusals"]
            assert set(stats["refusals"]) == {"output tokens per minute"}


def test_a_provider_whose_sdk_is_missing_is_refused_before_any_call(tmp_path: Path, sim: SimServer) -> None:
    shim = tmp_path / "shim" / "anthropic"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named anthropic (test shim)')\n")
    data = write_jsonl(tmp_path / "data.jsonl", _mixed_rows(4))
    config = _three_providers_config(tmp_path / "config.json", sim)
    env = {"PYTHONPATH": os.pathsep.join([str(shim.parent), *sys.path])}
    for command in (("run", str(data), "-c", str(config), "-o", str(tmp_path / "out.jsonl")),
                    ("estimate", str(data), "-c", str(config))):
        result = cli(*command, env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "pip install 'opt-queue[anthropic]'" in result.stderr and "api_keys[1]" in result.stderr
    assert sim.stats()["calls"] == 0
