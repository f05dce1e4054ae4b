"""What a 200 response of each endpoint says: the row's answer, its usage, and, for structured
outputs, whether the answer matches the request's JSON schema. Pure functions, no network.

The *value* of an answer is what the ``seed`` output format writes: the text of a chat
completion, a response or a completion (a tool call's JSON when the model called tools instead
of writing), the vector of an embedding (a list of vectors for several inputs) and the result
object of a moderation (a list for several inputs). :meth:`Reply.full` is the ``full`` format's
object.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from opt_queue.core.request import CHAT_URL


class AnswerError(Exception):
    """A 200 response without a usable answer; ``usage`` is what it reports (it is billed)."""

    usage: dict[str, Any] | None = None


class BadResponse(AnswerError):
    """A 200 response that holds no usable answer (malformed JSON, empty choices)."""


class ContentFiltered(AnswerError):
    """The model withheld the answer (``finish_reason: content_filter``)."""


class Refused(AnswerError):
    """The model refused (``message.refusal``, under structured outputs): final, never retried."""


@dataclass
class Reply:
    """One endpoint's answer, read from its response body."""

    value: Any
    text: str | None = None
    """The text the model wrote (checked against a JSON schema); None for vectors and moderations."""
    finish_reason: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)
    tool_calls: list[Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """More for the ``full`` format: every choice's text when ``n > 1``, logprobs."""

    @property
    def prompt_tokens(self) -> int:
        return int(self.usage.get("prompt_tokens") or self.usage.get("input_tokens") or 0)

    @property
    def completion_tokens(self) -> int:
        return int(self.usage.get("completion_tokens") or self.usage.get("output_tokens") or 0)

    @property
    def cached_tokens(self) -> int:
        details = self.usage.get("prompt_tokens_details") or self.usage.get("input_tokens_details") or {}
        return int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0

    @property
    def cache_write_tokens(self) -> int:
        """Prompt tokens written to the provider's cache (Anthropic bills them above the input price)."""
        details = self.usage.get("prompt_tokens_details") or {}
        return int(details.get("cache_write_tokens") or 0) if isinstance(details, dict) else 0

    @property
    def reasoning_tokens(self) -> int:
        details = self.usage.get("completion_tokens_details") or self.usage.get("output_tokens_details") or {}
        return int(details.get("reasoning_tokens") or 0) if isinstance(details, dict) else 0

    def full(self, parsed: Any = None) -> dict[str, Any]:
        """The ``full`` output format's object for this answer."""
        if self.text is None:  # embeddings, moderations
            name = "embedding" if isinstance(self.value, list) else "results"
            return {name: self.value, "usage": self.usage or None, **self.extra}
        return {"text": self.text, "finish_reason": self.finish_reason, "usage": self.usage or None,
                "tool_calls": self.tool_calls, "parsed": parsed, **self.extra}


def read(url: str, data: Any) -> Reply:
    """The :class:`Reply` of a 200 response ``data`` from endpoint ``url`` (OpenAI's shapes, or
    another provider's native answer, known by its shape). A refusal raises :class:`Refused`, a
    withheld answer :class:`ContentFiltered`, no usable answer :class:`BadResponse`."""
    if not isinstance(data, dict):
        raise BadResponse("the server answered 200 with a body that is not a JSON object")
    if data.get("type") == "message" and "content" in data:
        return _anthropic(data)
    if "candidates" in data or "promptFeedback" in data:
        return _gemini(data)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    try:
        reply = _READERS.get(url, _chat)(data)
    except AnswerError as exc:
        exc.usage = usage or None
        raise
    reply.usage = usage
    return reply


def _chat(data: dict[str, Any]) -> Reply:
    choices = data.get("choices")
    if not choices or not isinstance(choices[0], dict):
        raise BadResponse("the server answered 200 with no choices")
    choice = choices[0]
    message = choice.get("message") or {}
    content = message.get("content")
    finish = choice.get("finish_reason")
    tool_calls = message.get("tool_calls") or None
    if message.get("refusal"):
        raise Refused(f"the model refused: {message['refusal']}")
    if content is None or (not str(content).strip() and tool_calls):
        if tool_calls:
            content = json.dumps(tool_calls, ensure_ascii=False)
        elif finish == "content_filter":
            raise ContentFiltered("the answer was withheld by the content filter")
        else:
            raise BadResponse(f"the server answered with no content (finish_reason {finish!r})")
    text = str(content).strip()
    extra: dict[str, Any] = {}
    if len(choices) > 1:
        extra["choices"] = [_choice_text(c) for c in choices]
    if choice.get("logprobs") is not None:
        extra["logprobs"] = choice["logprobs"]
    return Reply(value=text, text=text, finish_reason=finish, tool_calls=tool_calls, extra=extra)


def _choice_text(choice: Any) -> str | None:
    message = choice.get("message") or {} if isinstance(choice, dict) else {}
    content = message.get("content")
    return str(content).strip() if content is not None else None


def _responses(data: dict[str, Any]) -> Reply:
    status = data.get("status")
    if status == "failed":
        error = data.get("error") or {}
        raise BadResponse(f"the response failed: {error.get('message') or error}")
    texts: list[str] = []
    calls: list[Any] = []
    for item in data.get("output") or []:
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            for part in item.get("content") or []:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "refusal":
                    raise Refused(f"the model refused: {part.get('refusal')}")
                if part.get("type") == "output_text":
                    texts.append(str(part.get("text") or ""))
        elif item.get("type") == "function_call":
            calls.append(item)
    reason = (data.get("incomplete_details") or {}).get("reason") if status == "incomplete" else None
    finish = {"max_output_tokens": "length", "content_filter": "content_filter"}.get(reason or "", reason)
    if not texts and not calls:
        if finish == "content_filter":
            raise ContentFiltered("the answer was withheld by the content filter")
        raise BadResponse(f"the response holds no output text (status {status!r})")
    if not texts:
        text = json.dumps(calls, ensure_ascii=False)
        return Reply(value=text, text=text, finish_reason="tool_calls", tool_calls=calls)
    text = "".join(texts).strip()
    return Reply(value=text, text=text, finish_reason=finish or "stop", tool_calls=calls or None)


def _completions(data: dict[str, Any]) -> Reply:
    choices = data.get("choices")
    if not choices or not isinstance(choices[0], dict) or not isinstance(choices[0].get("text"), str):
        raise BadResponse("the server answered 200 with no choices")
    text = choices[0]["text"].strip()
    extra: dict[str, Any] = {}
    if len(choices) > 1:
        extra["choices"] = [str(c.get("text", "")).strip() for c in choices if isinstance(c, dict)]
    if choices[0].get("logprobs") is not None:
        extra["logprobs"] = choices[0]["logprobs"]
    return Reply(value=text, text=text, finish_reason=choices[0].get("finish_reason"), extra=extra)


def _embeddings(data: dict[str, Any]) -> Reply:
    items = data.get("data")
    if not items or not all(isinstance(i, dict) and "embedding" in i for i in items):
        raise BadResponse("the server answered 200 with no embedding")
    vectors = [i["embedding"] for i in sorted(items, key=lambda i: i.get("index", 0))]
    return Reply(value=vectors[0] if len(vectors) == 1 else vectors)


def _moderations(data: dict[str, Any]) -> Reply:
    results = data.get("results")
    if not results or not all(isinstance(r, dict) for r in results):
        raise BadResponse("the server answered 200 with no moderation results")
    return Reply(value=results[0] if len(results) == 1 else results)


_READERS = {CHAT_URL: _chat, "/v1/responses": _responses, "/v1/completions": _completions,
            "/v1/embeddings": _embeddings, "/v1/moderations": _moderations}


# -- structured outputs ---------------------------------------------------------------------------


def schema_of(url: str, body: dict[str, Any]) -> tuple[str, dict[str, Any] | None] | None:
    """``("json_schema", schema)`` or ``("json_object", None)`` when the request asks for JSON
    (chat's ``response_format``, the Responses API's ``text.format``), else None."""
    spec = body.get("response_format") if url == CHAT_URL else (body.get("text") or {}).get("format") \
        if url == "/v1/responses" and isinstance(body.get("text"), dict) else None
    if not isinstance(spec, dict):
        return None
    kind = spec.get("type")
    if kind == "json_object":
        return "json_object", None
    if kind == "json_schema":
        inner = spec.get("json_schema", spec) if url == CHAT_URL else spec
        schema = inner.get("schema") if isinstance(inner, dict) else None
        return "json_schema", schema if isinstance(schema, dict) else None
    return None


LENGTH_WARNING = "the answer was cut at the token limit (finish_reason: length); raise max_tokens"
"""The warning kept with an answer whose ``finish_reason`` is ``length``."""


def warning(reply: Reply) -> str | None:
    """What deserves a look in an answer that is kept (see :data:`LENGTH_WARNING`)."""
    return LENGTH_WARNING if reply.finish_reason == "length" else None


def structured(url: str, body: dict[str, Any], reply: Reply) -> tuple[Any, str | None, bool]:
    """``(parsed JSON, problem, final)`` when the request ``body`` asks for JSON (a schema or a
    JSON object), else ``(None, None, False)``. An answer that is a tool call is not checked;
    ``final``: the schema itself is broken, so asking again cannot help."""
    wanted = schema_of(url, body)
    if wanted is None or reply.text is None or reply.tool_calls:
        return None, None, False
    try:
        return (*check(reply.text, *wanted), False)
    except ValueError as exc:
        return None, str(exc), True


def check(text: str, kind: str, schema: dict[str, Any] | None) -> tuple[Any, str | None]:
    """``(parsed JSON, None)`` when ``text`` is JSON matching ``schema``, else ``(None, why not)``.
    Raises ValueError when the schema itself is not valid (asking again cannot help)."""
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        return None, f"the answer is not valid JSON ({exc})"
    if kind == "json_schema" and schema is not None:
        import jsonschema  # only structured outputs need it

        validator = jsonschema.validators.validator_for(schema)
        try:
            validator.check_schema(schema)
        except jsonschema.exceptions.SchemaError as exc:
            raise ValueError(f"the request's JSON schema is not valid: {exc.message}") from None
        error = jsonschema.exceptions.best_match(validator(schema).iter_errors(parsed))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path)
            return None, f"{error.message}" + (f" (at {where})" if where else "")
    return parsed, None

@dataclass
class RowResult:
    """The final outcome of one row, as published to the job's results stream.

    ``answer`` is the ``seed`` format's value (text, vector or object; None for a failure);
    ``detail`` what the job's output format needs beyond it (``formats``), None for ``seed``.
    ``warning`` marks an answer that is kept but deserves a look (``finish_reason: length``)."""

    index: str
    answer: Any
    error_type: str | None = None
    error: str | None = None
    attempts: int = 0
    key: str | None = None
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    warning: str | None = None
    detail: dict[str, Any] | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float | None = 0.0
    """Dollars of the call that answered (None: the model's price is unknown)."""
    copy_of: str | None = None
    """The row whose identical request answered this one (it cost nothing)."""
    retryable: bool = True
    """A null only: whether sending the same request again can help (a timeout, a 5xx can; a context
    length, a content filter cannot: a re-run keeps such a null unless the request changed)."""
    request: str | None = None
    """A null only: ``request.failure_key`` of what failed."""

    def to_fields(self) -> dict[str, str]:
        fields = asdict(self)
        if self.detail is None:
            del fields["detail"]  # seed results stay as small as before
        return {"r": json.dumps(fields, ensure_ascii=False)}

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> RowResult:
        raw = json.loads(fields.get(b"r", fields.get("r")))
        raw.pop("seq", None)  # published by 0.1 workers
        if raw.get("detail") is None:
            raw.pop("detail", None)
        copy = fields.get(b"copy", fields.get("copy"))
        if copy is not None:  # the result of the row's primary (lua/publish.lua)
            copy = copy.decode() if isinstance(copy, bytes) else copy
            raw.update(copy_of=raw["index"], index=copy, cost=0.0)
        return cls(**raw)


ANTHROPIC_FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
                    "model_context_window_exceeded": "length", "pause_turn": "pause_turn"}
"""Anthropic's ``stop_reason`` in OpenAI's ``finish_reason`` words."""


def _messages_usage(native: Any) -> dict[str, Any]:
    """A Messages usage in OpenAI's names (what opt-queue's bookkeeping and prices read)."""
    if not isinstance(native, dict):
        return {}
    read = int(native.get("cache_read_input_tokens") or 0)
    written = int(native.get("cache_creation_input_tokens") or 0)
    prompt = int(native.get("input_tokens") or 0) + read + written
    completion = int(native.get("output_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": written}}


def _anthropic(data: dict[str, Any]) -> Reply:
    """An Anthropic Messages response (``"type": "message"``): its text, ``finish_reason`` in
    OpenAI's words, ``tool_use`` blocks as tool calls, usage in OpenAI's names and the native body
    (``native``). ``stop_reason: refusal`` raises :class:`Refused`."""
    usage = _messages_usage(data.get("usage"))
    blocks = [b for b in data.get("content") or [] if isinstance(b, dict)]
    text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text").strip()
    tool_calls = [{"id": b.get("id"), "type": "function",
                   "function": {"name": b.get("name"), "arguments": json.dumps(b.get("input") or {}, ensure_ascii=False)}}
                  for b in blocks if b.get("type") == "tool_use"] or None
    stop = data.get("stop_reason")
    problem: AnswerError | None = None
    if stop == "refusal":
        problem = Refused("the model refused (stop_reason refusal)")
    elif not text and not tool_calls:
        problem = BadResponse(f"the server answered with no content (stop_reason {stop!r})")
    if problem is not None:
        problem.usage = usage or None
        raise problem
    value = text or json.dumps(tool_calls, ensure_ascii=False)
    return Reply(value=value, text=value, finish_reason=ANTHROPIC_FINISH.get(stop, stop), usage=usage,
                         tool_calls=tool_calls, extra={"native": data})


GEMINI_FINISH = {"STOP": "stop", "MAX_TOKENS": "length"}
"""Gemini's ``finishReason`` in OpenAI's words (safety stops are nulls: :data:`GEMINI_WITHHELD`)."""
GEMINI_WITHHELD = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY",
                             "LANGUAGE"})


def _gemini_usage(native: Any) -> dict[str, Any]:
    """Gemini's ``usageMetadata`` in OpenAI's names: thoughts are output (billed so) and reasoning."""
    if not isinstance(native, dict):
        return {}
    prompt = int(native.get("promptTokenCount") or 0)
    thoughts = int(native.get("thoughtsTokenCount") or 0)
    completion = int(native.get("candidatesTokenCount") or 0) + thoughts
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": int(native.get("cachedContentTokenCount") or 0)},
            "completion_tokens_details": {"reasoning_tokens": thoughts}}


def _gemini_candidate(candidate: Any) -> tuple[str, list[Any] | None, str | None]:
    content = candidate.get("content") if isinstance(candidate, dict) else None
    parts = [p for p in (content or {}).get("parts") or [] if isinstance(p, dict)]
    text = "".join(p.get("text", "") for p in parts if "text" in p and not p.get("thought")).strip()
    calls = [{"id": p["functionCall"].get("id") or f"call_{i}", "type": "function",
              "function": {"name": p["functionCall"].get("name"),
                           "arguments": json.dumps(p["functionCall"].get("args") or {}, ensure_ascii=False)}}
             for i, p in enumerate(parts) if isinstance(p.get("functionCall"), dict)] or None
    return text, calls, candidate.get("finishReason") if isinstance(candidate, dict) else None


def _gemini(data: dict[str, Any]) -> Reply:
    """A Gemini ``generateContent`` response: the first candidate's text (thoughts left out),
    ``functionCall`` parts as tool calls, usage in OpenAI's names, every candidate's text with
    ``candidateCount`` > 1, and the native body (``native``). A blocked prompt or an answer
    stopped for safety raises :class:`ContentFiltered` with the reason."""
    usage = _gemini_usage(data.get("usageMetadata"))
    problem: AnswerError | None = None
    candidates = [c for c in data.get("candidates") or [] if isinstance(c, dict)]
    blocked = (data.get("promptFeedback") or {}).get("blockReason") if isinstance(data.get("promptFeedback"), dict) else None
    text, calls, finish = _gemini_candidate(candidates[0]) if candidates else ("", None, None)
    if blocked:
        problem = ContentFiltered(f"the prompt was blocked ({blocked})")
    elif not candidates:
        problem = BadResponse("the server answered 200 with no candidates")
    elif finish in GEMINI_WITHHELD and not text:
        problem = ContentFiltered(f"the answer was withheld (finishReason {finish})")
    elif not text and not calls:
        problem = BadResponse(f"the server answered with no content (finishReason {finish!r})")
    if problem is not None:
        problem.usage = usage or None
        raise problem
    value = text or json.dumps(calls, ensure_ascii=False)
    extra: dict[str, Any] = {"native": data}
    if len(candidates) > 1:
        extra["choices"] = [_gemini_candidate(c)[0] for c in candidates]
    return Reply(value=value, text=value, finish_reason="tool_calls" if calls and not text else
                 GEMINI_FINISH.get(str(finish), str(finish).lower() if finish else None),
                 usage=usage, tool_calls=calls, extra=extra)
