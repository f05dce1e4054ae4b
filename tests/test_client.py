"""Pure pieces of the API client: durations, pacing hints, error classification."""

from __future__ import annotations

import pytest

from opt_queue.providers import Kind, redact
from opt_queue.providers.openai import classify_status, parse_duration, retry_after_seconds
from opt_queue.core.tokens import char_estimate, estimate_tokens


@pytest.mark.parametrize("text, seconds", [("12ms", 0.012), ("1.5s", 1.5), ("6m0s", 360.0),
                                           ("1h2m3s", 3723.0), ("20", 20.0), ("0.25", 0.25)])
def test_go_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_unparseable_duration_is_none() -> None:
    assert parse_duration("soon") is None and parse_duration(None) is None


def test_retry_hint_prefers_ms_header_then_retry_after_then_reset_then_message() -> None:
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({"retry-after": "9", "x-ratelimit-reset-requests": "1s"}) == 9
    assert retry_after_seconds({"x-ratelimit-reset-tokens": "6m0s"}) == 360
    msg = ("Rate limit reached for gpt-4o-mini in organization org-x on requests per min (RPM): "
           "Limit 3, Used 3, Requested 1. Please try again in 20s.")
    assert retry_after_seconds({}, msg) == 20
    legacy = "Rate limit reached for default-gpt-3.5-turbo in organization org-x on requests per min. Limit: 3 / min. Please try again in 20s."
    assert retry_after_seconds({}, legacy) == 20
    assert retry_after_seconds({}, "") is None


def test_a_server_error_takes_retry_after_but_never_a_rate_limit_reset() -> None:
    resets = {"x-ratelimit-reset-requests": "60s", "x-ratelimit-reset-tokens": "6m0s"}
    assert classify_status(500, {"error": {"message": "boom"}}, resets).retry_after is None
    assert classify_status(503, None, {**resets, "retry-after": "2"}).retry_after == 2
    assert classify_status(502, None, {"retry-after-ms": "250"}, "<html>").retry_after == 0.25
    assert classify_status(429, {"error": {"code": "rate_limit_exceeded", "message": "slow"}},
                           resets).retry_after == 60  # on a 429 the reset is the hint


def err(code: str | None, message: str) -> dict:
    return {"error": {"message": message, "type": "x", "param": None, "code": code}}


@pytest.mark.parametrize("status, body, kind", [
    (429, err("rate_limit_exceeded", "Rate limit reached ... try again in 2s."), Kind.RATE_LIMITED),
    (429, err("insufficient_quota", "You exceeded your current quota, please check your plan"), Kind.KEY_DEAD),
    (429, err("rate_limit_exceeded", "Request too large for gpt-4o-mini on tokens per min (TPM): Limit 30000, Requested 45000"), Kind.TOO_LARGE),
    (401, err("invalid_api_key", "Incorrect API key provided: sk-ab***wxyz."), Kind.KEY_DEAD),
    (403, err(None, "not allowed"), Kind.KEY_DEAD),
    (400, err("context_length_exceeded", "This model's maximum context length is 4097 tokens."), Kind.TOO_LONG),
    (404, err("model_not_found", "The model `gpt-5-foo` does not exist"), Kind.JOB_CONFIG),
    (400, err("unknown_parameter", "Unrecognized request argument supplied: foo"), Kind.JOB_CONFIG),
    (500, err("server_error", "The server had an error"), Kind.TRANSIENT),
    (503, err(None, "That model is currently overloaded"), Kind.TRANSIENT),
    (502, None, Kind.TRANSIENT),
    (400, err("invalid_value", "bad image url"), Kind.BAD_ROW),
])
def test_error_classification_follows_the_policy_table(status: int, body: dict | None, kind: Kind) -> None:
    f = classify_status(status, body, {}, "<html>502 Bad Gateway</html>")
    assert f.kind is kind and f.message


def test_rate_limit_carries_hint_and_server_limits() -> None:
    f = classify_status(429, err("rate_limit_exceeded", "Rate limit reached"),
                        {"retry-after": "3", "x-ratelimit-limit-requests": "2", "x-ratelimit-limit-tokens": "900"})
    assert f.retry_after == 3 and f.server_limits == {"requests": 2, "tokens": 900}


def test_redact_hides_secrets() -> None:
    assert redact("key sk-secret-123 bad", ["sk-secret-123"]) == "key *** bad"


def test_token_estimate_covers_prompt_and_completion_budget() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 300}], "max_tokens": 50}
    assert estimate_tokens(body) >= 300 / 4 + 50
    assert estimate_tokens({"messages": [{"role": "user", "content": ""}]}) >= 256


def test_the_character_estimate_never_undercounts() -> None:
    """An upper bound of what tokenizers give: English, digits, CJK (the original toolkit's users
    write Chinese), emoji. tiktoken's cl100k_base counts, where this machine has its encoding."""
    samples = {"The quick brown fox jumps over the lazy dog. " * 20: 200,
               "1234567890" * 30: 100,
               "请把下面的句子翻译成英文：今天天气很好，我们去公园散步吧。" * 10: 330,
               "😀🎉🚀" * 20: 180}
    for text, real in samples.items():
        assert char_estimate(text) >= real, text[:20]
    try:
        import tiktoken
        enc = tiktoken.get_encoding("cl100k_base")
    except Exception:
        return
    for text in samples:
        assert char_estimate(text) >= len(enc.encode(text))


def test_a_429_without_headers_still_says_its_per_minute_limit_in_the_message() -> None:
    f = classify_status(429, err("rate_limit_exceeded", "Rate limit reached for gpt-4 in organization org-x on "
                                 "requests per min (RPM): Limit 3, Used 3, Requested 1."), {})
    assert f.server_limits == {"requests": 3}
    day = classify_status(429, err("rate_limit_exceeded", "Rate limit reached on requests per day (RPD): "
                                   "Limit 200, Used 200, Requested 1."), {})
    assert day.server_limits == {}  # a day's limit is not the minute's
    slow = classify_status(503, err("slow_down", "Please slow down"), {"x-ratelimit-limit-requests": "500"})
    assert slow.kind is Kind.SLOW_DOWN and slow.server_limits == {"requests": 500}
