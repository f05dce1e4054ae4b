"""A simulated OpenAI-compatible API: a real HTTP server on loopback for the demo and tests.

It serves every endpoint of the Batch file format (chat completions, responses, embeddings,
completions, moderations), with usage as the API reports it (cached prompt tokens for a prompt
seen before from ``cache_min_tokens``; reasoning tokens for o-series models), ``n`` choices,
structured outputs (JSON built from the request's schema; a prompt with ``BADJSON`` gets an
answer that does not match until asked again, ``ALWAYSBAD`` never matches), the Flex tier
(``service_tier: "flex"``: slower by ``flex_latency``, 429 "resource unavailable" at
``flex_unavailable_rate``) and an ``x-request-id`` header.

It behaves like the real API where opt-queue cares (see OPENAI_API_FACTS.md): per-key (or per
organization) RPM, TPM and RPD sliding windows with OpenAI-shaped 429s and ``x-ratelimit-*``
headers, 401 for unknown keys, 429 ``insufficient_quota`` for spent keys, 400
``context_length_exceeded``, 404 for unknown models, and injectable faults (latency, 5xx, HTML
502, timeouts, connection resets, malformed bodies, empty ``choices``). Answers are deterministic:
:func:`sim_answer` tells a test what the API will say to a prompt.

Response shapes that are not plain text, on demand: a request with ``tools`` gets a call of its
first tool (``content: null``, ``finish_reason: "tool_calls"``); a last message containing
``REFUSE`` gets a refusal (``message.refusal``); a ``max_tokens`` below the answer's length cuts
it (``finish_reason: "length"``).

**How it counts prompt tokens** is a setting, for its rate limits (``limit_count``) and for the
usage it reports and bills (``usage_count``) separately, because real servers differ
(:data:`TOKEN_COUNTS`): ``typical`` (4 ASCII characters a token, one per other character, 3 per
message), ``chars4`` (ceil(characters / 4) of the prompt's text, no overhead: what OpenAI's rate
limiter is reported to count), ``o200k`` / ``cl100k`` (the tokenizer with the chat format's
overhead: what OpenAI bills) and ``estimator`` (opt-queue's own count of the request). A client
that assumes the server counts as it does is tested against the others.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from opt_queue.core.config import fingerprint
from opt_queue.core.tokens import TOKEN_COUNTS
from opt_queue.core.request import CHAT_URL, ENDPOINTS
from opt_queue.sim.anthropic import CLAUDE_MODELS, SimMessages
from opt_queue.sim.batch import SimBatches
from opt_queue.sim.gemini import GEMINI_MODELS, SimGemini
from opt_queue.sim.common import Windows as _Windows
from opt_queue.sim.common import _schema_instance, count_tokens, prompt_key, sim_answer

DEFAULT_MODELS = {"gpt-3.5-turbo-0613": 4096, "gpt-3.5-turbo": 4096, "gpt-3.5-turbo-16k-0613": 16384,
                  "gpt-4o-mini": 128000, "o3-mini": 200000, "gpt-3.5-turbo-instruct": 4096,
                  "text-embedding-3-small": 8192, "omni-moderation-latest": 32768, **CLAUDE_MODELS, **GEMINI_MODELS}
_ROUTES = {**{u: u for u in ENDPOINTS}, **{u.removeprefix("/v1"): u for u in ENDPOINTS},
           **{"/openai/deployments/{deployment}" + u.removeprefix("/v1"): u for u in ENDPOINTS}}
REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
"""Models that think before they answer: their usage reports reasoning tokens (billed as output)."""


@dataclass
class SimKey:
    """One key the simulated API knows: its limits and whether it works."""

    key: str
    rpm: int | None = None
    tpm: int | None = None
    rpd: int | None = None
    otpm: int | None = None  # Anthropic's output tokens per minute (``tpm`` is its input tokens' window)
    org: str | None = None
    dead: str | None = None  # "invalid" (401), "quota" (429 insufficient_quota), "forbidden" (403)
    models: dict[str, dict[str, int]] | None = None  # per model: {"rpm", "tpm", "rpd"} replacing the key's

    def limits(self, model: str) -> SimKey:
        """This key's limits for ``model`` (limits are per organization and model, as on the API)."""
        own = (self.models or {}).get(model)
        if not own:
            return self
        return SimKey(self.key, own.get("rpm", self.rpm), own.get("tpm", self.tpm), own.get("rpd", self.rpd),
                      own.get("otpm", self.otpm), self.org, self.dead)


@dataclass
class SimConfig:
    """How the simulated API behaves; every rate is a probability per request."""

    keys: list[SimKey] = field(default_factory=list)
    minute: float = 60.0
    day: float = 86400.0
    models: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MODELS))
    latency: float = 0.0
    latency_jitter: float = 0.0
    transient_rate: float = 0.0
    timeout_rate: float = 0.0
    reset_rate: float = 0.0
    malformed_rate: float = 0.0
    empty_choices_rate: float = 0.0
    hang_seconds: float = 30.0
    send_headers: bool = True
    burst_divisor: int = 0  # > 0: a key's RPM also holds over every minute/divisor, at rpm/divisor
    slow_down_above: float = 0.0  # > 0: 503 slow_down when an organization's model gets more per second
    cache_min_tokens: int = 1024  # a prompt seen before reports cached tokens from this length (the API's)
    flex_unavailable_rate: float = 0.0  # a Flex request (service_tier "flex") answered 429 resource unavailable
    flex_latency: float = 0.0  # more seconds before a Flex answer
    batch_delay: float = 2.0  # seconds from a batch's creation to its completion (rows finish in file order)
    batch_expire_after: float = 0.0  # > 0: a batch not completed this long after its creation expires
    batch_cancel_delay: float = 0.0  # seconds a cancelled batch stays "cancelling" (the real API: up to 10 min)
    batch_enqueued_tokens: int = 0  # > 0: an organization's enqueued-token limit per model (prompt tokens)
    batch_max_lines: int = 50_000
    limit_count: str = "typical"  # how the rate-limit windows count a prompt (TOKEN_COUNTS)
    usage_count: str = "typical"  # how the usage counts (and bills) a prompt (TOKEN_COUNTS)
    overloaded_rate: float = 0.0  # Anthropic's endpoint: 529 overloaded_error; Gemini's: 503 overloaded
    overloaded_every: int = 0  # > 0: every n-th admitted call of those endpoints is overloaded (deterministic)
    anthropic_output_count: str = "max_tokens"  # "max_tokens" (charged on arrival, adjusted) or "actual"
    anthropic_token_rounding: int = 1000  # Anthropic's remaining-token headers: rounded to the nearest thousand
    anthropic_headers_at: str = "arrival"  # the windows its headers state: on the request's "arrival", or at its "end"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("limit_count", "usage_count"):
            if getattr(self, name) not in TOKEN_COUNTS:
                raise ValueError(f"{name} must be one of {', '.join(TOKEN_COUNTS)}, not {getattr(self, name)!r}")


def _texts(value: Any) -> list[str]:
    """The strings of a prompt field (a string, a list of strings, messages or input items)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return _texts(value.get("content", value.get("text")))
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


def _count_prompt(how: str, url: str, body: dict[str, Any], model: str, typical: int) -> int:
    """A request's prompt tokens counted ``how`` (:data:`TOKEN_COUNTS`); ``typical`` is that count."""
    if how == "typical":
        return typical
    if how == "chars4":
        endpoint = ENDPOINTS.get(url, ENDPOINTS[CHAT_URL])
        chars = sum(len(t) for name in endpoint.prompt for t in _texts(body.get(name)))
        return math.ceil(chars / 4)
    if how == "estimator":
        from opt_queue.core.tokens import estimate_parts  # the client's own count: the one way that agrees

        return estimate_parts(body, url)[0]
    return _tokenizer_count("o200k_base" if how == "o200k" else "cl100k_base", url, body)


@functools.cache
def _encoding(name: str) -> Any:
    import bpe_openai

    return bpe_openai.get_encoding(name)


def _tokenizer_count(encoding: str, url: str, body: dict[str, Any]) -> int:
    """A prompt as OpenAI bills it, written apart from opt-queue's own count (``tokens.py``) so that
    the two can disagree: the tokenizer's ``encode_ordinary`` on every text, and for chat messages 3
    tokens each, their role, content and name (plus one), and 3 that prime the reply."""
    enc = _encoding(encoding)

    def n(text: Any) -> int:
        return len(enc.encode_ordinary(text)) if isinstance(text, str) else 0

    def content(value: Any) -> int:
        if isinstance(value, list):
            return sum(n(part.get("text")) if isinstance(part, dict) else n(part) for part in value)
        return n(value)

    if url in (CHAT_URL, "/v1/responses"):
        given = body.get("messages") if url == CHAT_URL else body.get("input")
        items = [{"role": "user", "content": given}] if isinstance(given, str) else list(given or [])
        if url != CHAT_URL and body.get("instructions"):
            items.insert(0, {"role": "system", "content": body["instructions"]})
        total = 3
        for m in items:
            if isinstance(m, dict):
                total += 3 + n(m.get("role")) + content(m.get("content"))
                if m.get("name"):
                    total += n(m["name"]) + 1
        return total
    endpoint = ENDPOINTS.get(url, ENDPOINTS[CHAT_URL])
    return sum(n(t) for name in endpoint.prompt for t in _texts(body.get(name)))


ASKED_AGAIN = "does not match the required JSON schema"


@dataclass
class _Request:
    """One request the simulated API serves: its prompt, its token counts and its response."""

    url: str
    body: dict[str, Any]
    model: str
    prompt: list[Any]
    prompt_tokens: int
    max_tokens: int
    n: int = 1
    completion_tokens: int = 0
    built: dict[str, Any] = field(default_factory=dict)

    limit_prompt: int = 0  # the prompt as the rate-limit windows count it

    @classmethod
    def of(cls, url: str, body: dict[str, Any], model: str, usage_count: str = "typical",
           limit_count: str = "typical") -> _Request:
        """Read and check a request body (ValueError: a 400 with its message); count its prompt
        the two ways the config says."""
        req = cls._read(url, body, model)
        typical = req.prompt_tokens
        req.prompt_tokens = _count_prompt(usage_count, url, body, model, typical)
        req.limit_prompt = _count_prompt(limit_count, url, body, model, typical)
        req.built = req._build()
        return req

    @classmethod
    def _read(cls, url: str, body: dict[str, Any], model: str) -> _Request:
        n = int(body.get("n") or 1)
        if url == CHAT_URL:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("'messages' is a required property")
            tokens = sum(count_tokens(str(m.get("content") or "")) + 3 for m in messages) + 3  # OpenAI's count
            cap = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
            req = cls(url, body, model, messages, tokens, cap, n)
        elif url == "/v1/responses":
            given = body.get("input")
            if given in (None, "", []):
                raise ValueError("'input' is a required property")
            items = [{"role": "user", "content": given}] if isinstance(given, str) else list(given)
            if body.get("instructions"):
                items.insert(0, {"role": "system", "content": body["instructions"]})
            tokens = sum(count_tokens(t) + 3 for t in _texts(items))
            req = cls(url, body, model, items, tokens, int(body.get("max_output_tokens") or 0))
        elif url == "/v1/completions":
            prompts = body.get("prompt")
            prompts = [prompts] if isinstance(prompts, str) else prompts
            if not isinstance(prompts, list) or not prompts:
                raise ValueError("'prompt' is a required property")
            tokens = sum(count_tokens(str(p)) for p in prompts)
            req = cls(url, body, model, prompts, tokens, int(body.get("max_tokens") or 16), n)
        else:  # embeddings, moderations
            inputs = body.get("input")
            inputs = [inputs] if isinstance(inputs, str) else inputs
            if not isinstance(inputs, list) or not inputs or inputs == [""]:
                raise ValueError("'input' is a required property")
            tokens = sum(len(i) if isinstance(i, list) else count_tokens(str(i)) for i in inputs)
            req = cls(url, body, model, inputs, tokens, 0)
        return req

    def _text(self, messages: list[Any], cap: int) -> tuple[str, str]:
        """The answer to ``messages`` and its finish reason (structured outputs: JSON)."""
        spec = self.body.get("response_format") if self.url == CHAT_URL else (self.body.get("text") or {}).get("format")
        answer = sim_answer(self.model, messages)
        if isinstance(spec, dict) and spec.get("type") in ("json_schema", "json_object"):
            said = " ".join(_texts(messages))
            if "ALWAYSBAD" in said or ("BADJSON" in said and ASKED_AGAIN not in said):
                return json.dumps({"unexpected": answer}), "stop"
            schema = (spec.get("json_schema") or {}).get("schema") if self.url == CHAT_URL else spec.get("schema")
            return json.dumps(_schema_instance(schema, answer) if schema else {"answer": answer},
                              ensure_ascii=False), "stop"
        if cap and count_tokens(answer) > cap:
            return answer[: 4 * cap], "length"
        return answer, "stop"

    def _tool_call(self) -> dict[str, Any] | None:
        tools = self.body.get("tools")
        if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
            return None
        name = (tools[0].get("function") or {}).get("name") or tools[0].get("name") or "tool"
        last = " ".join(_texts(self.prompt[-1:]))
        return {"id": "call_" + prompt_key(self.prompt)[:12], "name": name,
                "arguments": json.dumps({"text": last[:40]}, ensure_ascii=False)}

    def _build(self) -> dict[str, Any]:
        last = " ".join(_texts(self.prompt[-1:]))
        if self.url == "/v1/embeddings":
            dims = int(self.body.get("dimensions") or 16)
            return {"object": "list", "model": self.model,
                    "data": [{"object": "embedding", "index": i, "embedding": _vector(self.model, p, dims)}
                             for i, p in enumerate(self.prompt)]}
        if self.url == "/v1/moderations":
            results = []
            for text in self.prompt:
                flagged = "FLAG" in str(text)
                results.append({"flagged": flagged, "categories": {"harassment": flagged, "violence": False},
                                "category_scores": {"harassment": 0.91 if flagged else 0.01, "violence": 0.0}})
            return {"id": "modr-sim", "model": self.model, "results": results}
        if self.url == "/v1/completions":
            choices = []
            for i, p in enumerate(self.prompt * self.n):
                text, finish = self._text([{"role": "user", "content": str(p)}], self.max_tokens)
                self.completion_tokens += count_tokens(text)
                choices.append({"index": i, "text": " " + text, "finish_reason": finish, "logprobs": None})
            return {"object": "text_completion", "model": self.model, "choices": choices}
        call = self._tool_call()
        if self.url == "/v1/responses":
            if "REFUSE" in last:
                content: list[Any] = [{"type": "refusal", "refusal": "I'm sorry, I cannot help with that request."}]
                output: list[Any] = [{"type": "message", "role": "assistant", "status": "completed", "content": content}]
                self.completion_tokens = 10
            elif call:
                output = [{"type": "function_call", "call_id": call["id"], "name": call["name"],
                           "arguments": call["arguments"], "status": "completed"}]
                self.completion_tokens = count_tokens(call["arguments"])
            else:
                text, finish = self._text(self.prompt, self.max_tokens)
                self.completion_tokens = count_tokens(text)
                output = [{"type": "message", "id": "msg_sim", "role": "assistant", "status": "completed",
                           "content": [{"type": "output_text", "text": text, "annotations": []}]}]
                if finish == "length":
                    return {"object": "response", "model": self.model, "status": "incomplete",
                            "incomplete_details": {"reason": "max_output_tokens"}, "output": output}
            return {"object": "response", "model": self.model, "status": "completed", "output": output}
        choices = []
        for i in range(self.n):
            if "REFUSE" in last:
                message: dict[str, Any] = {"role": "assistant", "content": None,
                                           "refusal": "I'm sorry, I cannot help with that request."}
                finish = "stop"
            elif call:
                message = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call["id"], "type": "function",
                     "function": {"name": call["name"], "arguments": call["arguments"]}}]}
                finish = "tool_calls"
            else:
                text, finish = self._text(self.prompt, self.max_tokens)
                message = {"role": "assistant", "content": f"\n {text} \n" if finish == "stop" else text}
            said = message.get("content") or json.dumps(message.get("tool_calls") or message.get("refusal"))
            self.completion_tokens += min(count_tokens(said.strip()), self.max_tokens or 1 << 30)
            choices.append({"index": i, "finish_reason": finish, "message": message, "logprobs": None})
        return {"object": "chat.completion", "model": self.model, "choices": choices}

    def response(self, number: int, cached: int) -> dict[str, Any]:
        """The response body, with its usage (cached prompt tokens, reasoning tokens)."""
        data = dict(self.built)
        if self.url in (CHAT_URL, "/v1/responses"):
            data["service_tier"] = "flex" if self.body.get("service_tier") == "flex" else "default"
        reasoning = 2 * self.completion_tokens if self.model.startswith(REASONING_PREFIXES) else 0
        output = self.completion_tokens + reasoning
        if self.url == "/v1/responses":
            data["id"] = f"resp_sim{number}"
            data["usage"] = {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
                             "output_tokens": output, "output_tokens_details": {"reasoning_tokens": reasoning},
                             "total_tokens": self.prompt_tokens + output}
        elif self.url in ("/v1/embeddings", "/v1/moderations"):
            if self.url == "/v1/embeddings":
                data["usage"] = {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens}
        else:
            data["id"] = f"{'chatcmpl' if self.url == CHAT_URL else 'cmpl'}-sim{number}"
            data["created"] = int(time.time())
            data["usage"] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": output,
                             "total_tokens": self.prompt_tokens + output,
                             "prompt_tokens_details": {"cached_tokens": cached},
                             "completion_tokens_details": {"reasoning_tokens": reasoning}}
        return data


def _vector(model: str, text: Any, dims: int) -> list[float]:
    """A deterministic unit vector for ``text``."""
    raw = b""
    seed = json.dumps([model, text], ensure_ascii=False).encode()
    while len(raw) < dims:
        seed = hashlib.sha256(seed).digest()
        raw += seed
    values = [b / 127.5 - 1.0 for b in raw[:dims]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


class SimAPI:
    """The aiohttp application and its counters."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.rng = random.Random(self.config.seed)
        self.windows: dict[tuple[str, str], _Windows] = {}
        self.batches = SimBatches(self)  # the Files and Batches API, a room of its own
        self.messages = SimMessages(self)  # Anthropic's Messages API
        self.gemini = SimGemini(self)  # the Gemini API's generateContent
        self.reset_stats()

    def reset_stats(self) -> None:
        self.calls = 0
        self.answered = 0
        self.rate_limited = 0
        self.refusals: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.per_prompt: Counter[str] = Counter()
        self.per_key: Counter[str] = Counter()
        self.calls_per_key: Counter[str] = Counter()  # every call, errors included, by fingerprint
        self.in_flight = 0
        self.max_in_flight = 0
        self.first_call: float | None = None
        self.last_call: float | None = None
        self.last_answer: float | None = None
        self.requests: list[dict[str, Any]] = []
        self.prompt_tokens_billed = 0  # the usage's prompt tokens over every answer
        self.peak_window_tokens: Counter[str] = Counter()  # per organization/model: the most its window held

    def stats(self) -> dict[str, Any]:
        return {"calls": self.calls, "answered": self.answered, "rate_limited": self.rate_limited,
                "prompt_tokens_billed": self.prompt_tokens_billed,
                "peak_window_tokens": dict(self.peak_window_tokens),
                "refusals": dict(self.refusals), "faults": dict(self.faults),
                "per_prompt": dict(self.per_prompt), "per_key": dict(self.per_key),
                "calls_per_key": dict(self.calls_per_key),
                "max_in_flight": self.max_in_flight, "first_call": self.first_call,
                "last_call": self.last_call, "last_answer": self.last_answer, "batch": self.batches.stats()}

    def key(self, secret: str) -> SimKey | None:
        for k in self.config.keys:
            if k.key == secret:
                return k
        return None

    def read_request(self, url: str, body: dict[str, Any], model: str, usage_count: str = "typical",
                     limit_count: str = "typical") -> _Request:
        """A request body as the synchronous endpoints read it (ValueError: a 400 and its message)."""
        return _Request.of(url, body, model, usage_count, limit_count)

    def paid(self, req: _Request) -> None:
        """Count a request's prompt as paid for (``per_prompt``: how often each prompt was)."""
        self.per_prompt[prompt_key(req.prompt)] += 1

    def authorize(self, secret: str) -> tuple[SimKey | None, web.Response | None]:
        """The key a request's secret names, or the error the API answers for it."""
        k = self.key(secret)
        if k is None or k.dead == "invalid":
            masked = (secret[:3] + "***" + secret[-4:]) if len(secret) > 8 else "***"
            return None, _error(401, f"Incorrect API key provided: {masked}. You can find your API key "
                                     f"at https://platform.openai.com/account/api-keys.",
                                "invalid_request_error", "invalid_api_key")
        if k.dead == "forbidden":
            return None, _error(403, "You are not allowed to sample from this model", "invalid_request_error",
                                "forbidden")
        if k.dead == "quota":
            return None, _error(429, "You exceeded your current quota, please check your plan and billing "
                                     "details.", "insufficient_quota", "insufficient_quota")
        return k, None

    def app(self) -> web.Application:
        application = web.Application(client_max_size=64 * 1024 * 1024)
        for url in ENDPOINTS:
            application.router.add_post(url, self.chat)
            application.router.add_post(url.removeprefix("/v1"), self.chat)
            application.router.add_post("/openai/deployments/{deployment}" + url.removeprefix("/v1"),
                                        self.chat)  # Azure
        self.batches.routes(application)
        self.messages.routes(application)
        self.gemini.routes(application)
        application.router.add_get("/_sim/stats", self._stats)
        application.router.add_post("/_sim/config", self._configure)
        return application

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _configure(self, request: web.Request) -> web.Response:
        for name, value in (await request.json()).items():
            if name == "keys":
                value = [SimKey(**k) for k in value]
            setattr(self.config, name, value)
        return web.json_response(asdict(self.config))

    # -- the endpoint ---------------------------------------------------------------------------
    def called(self) -> None:
        """Count a synchronous call of any endpoint (``calls``, ``first_call``, ``last_call``)."""
        self.calls += 1
        self.last_call = time.monotonic()
        self.first_call = self.first_call or self.last_call

    def record(self, body: Any, **fields: Any) -> None:
        """Keep a request's parameters (``received``) but its conversation, up to 10,000 of them."""
        if len(self.requests) < 10000 and isinstance(body, dict):
            self.requests.append({**fields, **{n: v for n, v in body.items() if n not in ("messages", "contents")}})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.called()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._chat(request)
        finally:
            self.in_flight -= 1

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        cfg = self.config
        resource = request.match_info.route.resource
        url = _ROUTES.get(resource.canonical if resource is not None else "", CHAT_URL)
        secret = (request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                  or request.headers.get("api-key", "").strip())  # Azure's header
        deployment = request.match_info.get("deployment")
        if deployment is not None and not request.query.get("api-version"):
            return _error(404, "Resource not found", "invalid_request_error", "404")
        self.calls_per_key[fingerprint(secret)] += 1
        k, refused = self.authorize(secret)
        if refused is not None:
            return refused
        assert k is not None
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error", None)
        if not isinstance(body, dict):
            return _error(400, "The body must be a JSON object.", "invalid_request_error", None)
        if len(self.requests) < 10000:
            seen = {k2: v for k2, v in body.items() if k2 != "messages"}
            extra = {h.lower(): v for h, v in request.headers.items()
                     if h.lower().startswith("x-") and not h.lower().startswith("x-stainless")}
            if extra:  # headers a config added (the SDK's own x-stainless-* left out)
                seen["_headers"] = extra
            if deployment is not None:
                seen["_azure"] = {"deployment": deployment, "api_version": request.query["api-version"]}
            if url != CHAT_URL:
                seen["_url"] = url
            self.requests.append(seen)
        model = body.get("model") or ("omni-moderation-latest" if url == "/v1/moderations" else None)
        if model not in cfg.models:
            return _error(404, f"The model `{model}` does not exist or you do not have access to it.",
                          "invalid_request_error", "model_not_found")
        try:
            req = _Request.of(url, body, model, cfg.usage_count, cfg.limit_count)
        except ValueError as exc:
            return _error(400, str(exc), "invalid_request_error", None)
        flex = body.get("service_tier") == "flex"
        if flex and self.rng.random() < cfg.flex_unavailable_rate:
            self.faults["flex_unavailable"] += 1
            return _error(429, "Resource unavailable: Flex processing has no capacity for this request now; "
                               "try again later or use the default service tier.", "resource_unavailable",
                          "resource_unavailable")
        if req.prompt_tokens + req.max_tokens > cfg.models[model]:
            return _error(400, f"This model's maximum context length is {cfg.models[model]} tokens. "
                               f"However, your messages resulted in {req.prompt_tokens} tokens. Please "
                               f"reduce the length of the messages.", "invalid_request_error",
                          "context_length_exceeded", param="messages")
        # The window counts a request as it arrives: its prompt plus its max_tokens (the real API's
        # rule), and a smaller usage afterwards gives nothing back. Without max_tokens, the answer.
        counted = req.limit_prompt + (req.max_tokens * req.n if req.max_tokens else req.completion_tokens)
        now = time.monotonic()
        win = self.windows.setdefault((k.org or k.key, model), _Windows())
        k = k.limits(model)
        if cfg.slow_down_above > 0 and sum(1 for ts, _ in win.log if ts > now - 1.0) + 1 > cfg.slow_down_above:
            self.faults["slow_down"] += 1
            return _error(503, "Please slow down: your traffic rose too quickly.", "server_error", "slow_down")
        refused = win.check(now, counted, k, cfg)
        if refused:
            self.rate_limited += 1
            what, wait = refused
            self.refusals[what] += 1
            limit = {"requests per min (RPM)": k.rpm, "tokens per min (TPM)": k.tpm,
                     "requests per day (RPD)": k.rpd}[what]
            resp = _error(429, f"Rate limit reached for {model} in organization org-sim on {what}: "
                               f"Limit {limit}, Used {limit}, Requested 1. Please try again in "
                               f"{max(wait, 0.001):.3f}s.", "requests", "rate_limit_exceeded")
            resp.headers["retry-after"] = str(max(1, math.ceil(wait)))
            resp.headers["retry-after-ms"] = str(max(1, int(wait * 1000)))
            self._limit_headers(resp, k, win)
            return resp
        win.admit(now, counted)
        held = sum(t for ts, t in win.log if ts > now - cfg.minute)
        scope = f"{k.org or fingerprint(k.key)}/{model}"
        self.peak_window_tokens[scope] = max(self.peak_window_tokens[scope], held)
        seen = self._window_headers(k, win)  # the headers tell the window as this request left it
        fault = await self._fault(request)
        if fault is not None:
            if fault.content_type == "application/json":
                self._limit_headers(fault, k, win, seen)  # the API's own errors carry them, a proxy's do not
            return fault
        delay = cfg.latency + (self.rng.uniform(0, cfg.latency_jitter) if cfg.latency_jitter else 0.0)
        delay += cfg.flex_latency if flex else 0.0
        if delay > 0:
            await asyncio.sleep(delay)
        self.answered += 1
        self.prompt_tokens_billed += req.prompt_tokens
        self.last_answer = time.monotonic()
        prompt_id = prompt_key(req.prompt)
        cached = (req.prompt_tokens // 128 * 128 if self.per_prompt[prompt_id]
                  and req.prompt_tokens >= cfg.cache_min_tokens else 0)
        self.per_prompt[prompt_id] += 1
        self.per_key[fingerprint(k.key)] += 1
        resp = web.json_response(req.response(self.calls, cached), dumps=lambda o: json.dumps(o, ensure_ascii=False))
        resp.headers["x-request-id"] = f"req_sim{self.calls}"
        self._limit_headers(resp, k, win, seen)
        return resp

    async def _fault(self, request: web.Request) -> web.StreamResponse | None:
        cfg, roll = self.config, self.rng.random()
        for name, rate in (("transient", cfg.transient_rate), ("timeout", cfg.timeout_rate),
                           ("reset", cfg.reset_rate), ("malformed", cfg.malformed_rate),
                           ("empty_choices", cfg.empty_choices_rate)):
            if roll < rate:
                self.faults[name] += 1
                return await self._inject(name, request)
            roll -= rate
        return None

    async def _inject(self, name: str, request: web.Request) -> web.StreamResponse:
        if name == "transient":
            kind = self.rng.choice((500, 503, 502))
            if kind == 502:
                return web.Response(status=502, content_type="text/html",
                                    text="<html><head><title>502 Bad Gateway</title></head></html>")
            msg = ("The server had an error while processing your request." if kind == 500
                   else "That model is currently overloaded with other requests.")
            return _error(kind, msg, "server_error", None)
        if name == "timeout":
            await asyncio.sleep(self.config.hang_seconds)
            return _error(500, "hung request finished late", "server_error", None)
        if name == "reset":
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionResetError("simulated connection reset")
        if name == "malformed":
            return web.Response(status=200, content_type="application/json", text='{"id": "x", "choi')
        return web.json_response({"id": "x", "object": "chat.completion", "choices": [],
                                  "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}})

    def _limit_headers(self, resp: web.StreamResponse, k: SimKey, win: _Windows,
                       seen: dict[str, str] | None = None) -> None:
        """Put the ``x-ratelimit-*`` headers on ``resp``: ``seen`` (the window as the request found
        it on arrival, when the API counted it), else the window now."""
        if self.config.send_headers:
            resp.headers.update(self._window_headers(k, win) if seen is None else seen)

    def _window_headers(self, k: SimKey, win: _Windows) -> dict[str, str]:
        if not self.config.send_headers:
            return {}
        now = time.monotonic()
        log = [(ts, t) for ts, t in win.log if ts > now - self.config.minute]
        oldest = log[0][0] + self.config.minute - now if log else 0.0
        out: dict[str, str] = {}
        if k.rpm is not None:
            out["x-ratelimit-limit-requests"] = str(k.rpm)
            out["x-ratelimit-remaining-requests"] = str(max(0, k.rpm - len(log)))
            out["x-ratelimit-reset-requests"] = f"{max(oldest, 0):.3f}s"
        if k.tpm is not None:
            used = sum(t for _, t in log)
            out["x-ratelimit-limit-tokens"] = str(k.tpm)
            out["x-ratelimit-remaining-tokens"] = str(max(0, k.tpm - used))
            out["x-ratelimit-reset-tokens"] = f"{max(oldest, 0):.3f}s"
        return out


def _error(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status)


class SimServer:
    """Runs a :class:`SimAPI` on loopback in a background thread."""

    def __init__(self, config: SimConfig | None = None, port: int = 0,
                 hosts: tuple[str, ...] = ("127.0.0.1",)) -> None:
        self.api = SimAPI(config)
        self.port = port
        self.hosts = hosts
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return self.base_url_for(self.hosts[0])

    def base_url_for(self, host: str) -> str:
        """The API base on ``host`` (one of the addresses it listens on)."""
        return f"http://{host}:{self.port}/v1"

    def __repr__(self) -> str:
        return f"<SimServer {self.base_url} calls={self.api.calls}>"

    def start(self) -> SimServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        async def boot() -> None:
            self._runner = web.AppRunner(self.api.app(), access_log=None, handle_signals=False)
            await self._runner.setup()
            for host in self.hosts:
                site = web.TCPSite(self._runner, host, self.port, backlog=4096)
                await site.start()
                self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()

        failed: list[BaseException] = []

        def serve() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(boot())
            except BaseException as exc:  # a port in use: the caller raises it
                failed.append(exc)
                ready.set()
                return
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="sim-api", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the simulated API did not start")
        if failed:
            self._loop = None
            raise failed[0]
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        loop = self._loop

        async def down() -> None:
            if self._runner is not None:
                await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(down(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> SimServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def configure(self, **changes: Any) -> None:
        """Change the behaviour while running (thread-safe)."""
        assert self._loop is not None

        async def apply() -> None:
            for name, value in changes.items():
                setattr(self.api.config, name, value)

        asyncio.run_coroutine_threadsafe(apply(), self._loop).result(10)

    def stats(self) -> dict[str, Any]:
        """The API's counters (calls, answers, 429s, faults, calls per prompt, ...)."""
        return self._read(self.api.stats)

    def reset_stats(self) -> None:
        """Start the counters again from zero."""
        self._read(self.api.reset_stats)

    def received(self) -> list[dict[str, Any]]:
        """The request bodies received so far (without their messages), oldest first."""
        return self._read(lambda: list(self.api.requests))

    def _read(self, fn: Any) -> Any:
        assert self._loop is not None

        async def read() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(10)
