"""What one input row asks of the API: the request, for every input format and endpoint.

Input formats, detected per file from its first row:

* seed:  ``{"index": "0", "instruction": "...", "input": "..."}`` (a chat completion)
* chat:  ``{"index": "7", "messages": [...], ...request params}`` (a chat completion)
* batch: ``{"custom_id": "...", "method": "POST", "url": "/v1/embeddings", "body": {...}}``, the
  Batch API's file format, for any of its endpoints (:data:`ENDPOINTS`); a file may mix them.

The job's model and parameters (``model`` in the config) complete chat requests; a batch row for
another endpoint carries its own model, as the Batch API requires. Pure functions: no Redis, no
network.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

SEED, CHAT, BATCH = "seed", "chat", "batch"
CHAT_URL = "/v1/chat/completions"


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of the Batch file format: where its prompt is and how its tokens count."""

    url: str
    prompt: tuple[str, ...]
    """Body fields holding the prompt (their text counts as prompt tokens)."""
    completion: tuple[str, ...] = ()
    """Body fields that cap the completion, first found wins (the server counts that cap on arrival)."""
    completion_default: int = 0
    """Completion tokens counted when the request sets no cap (0: the endpoint writes no text).
    The server then counts what the answer really used, which the limiter adds when the usage
    comes back."""
    default_model: str | None = None
    """The model the API uses when the request names none (``None``: the request must name one)."""

    @property
    def path(self) -> str:
        """The path below the API base (``chat/completions``)."""
        return self.url.removeprefix("/v1/")


ENDPOINTS: dict[str, Endpoint] = {e.url: e for e in (
    Endpoint(CHAT_URL, ("messages",), ("max_completion_tokens", "max_tokens"), 256),
    Endpoint("/v1/responses", ("input", "instructions"), ("max_output_tokens",), 256),
    Endpoint("/v1/embeddings", ("input",)),
    Endpoint("/v1/completions", ("prompt", "suffix"), ("max_tokens",), 16),
    Endpoint("/v1/moderations", ("input",), default_model="omni-moderation-latest"),
)}


class BadLine(ValueError):
    """One input line that cannot become a row."""


def endpoint(url: Any) -> Endpoint:
    """The endpoint of a batch row's ``url`` (``/v1/embeddings`` or ``/embeddings``)."""
    if isinstance(url, str):
        found = ENDPOINTS.get(url) or ENDPOINTS.get("/v1" + url if url.startswith("/") else "")
        if found is not None:
            return found
    raise BadLine(f'"url" must be one of {", ".join(ENDPOINTS)}, not {url!r}')


def detect(obj: dict[str, Any]) -> str:
    """The input format of a file, from its first row."""
    if "custom_id" in obj:
        return BATCH
    if "messages" in obj:
        return CHAT
    return SEED


def _index(value: Any, field_name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise BadLine(f'"{field_name}" must be a string (or an integer), not {type(value).__name__}')
    text = str(value)
    if not text.strip():
        raise BadLine(f'"{field_name}" is empty')
    return text


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise BadLine('"messages" must be a non-empty list')
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise BadLine('every message needs a "role" string and a "content"')
    return value


def seed_messages(instruction: str, text: str) -> list[dict[str, Any]]:
    """The chat messages of a seed prompt: the instruction as the system message, when given."""
    messages = [{"role": "system", "content": instruction}] if instruction else []
    messages.append({"role": "user", "content": text})
    return messages


def row_request(obj: dict[str, Any], fmt: str) -> tuple[str, str, dict[str, Any]]:
    """Return ``(index, endpoint url, request body)`` of one parsed line, or raise :class:`BadLine`.

    A chat body holds ``messages`` and the request parameters the row sets; the job's model and
    parameters are added by :func:`request_body`.
    """
    if fmt == SEED:
        if "index" not in obj:
            raise BadLine('missing "index"')
        index = _index(obj["index"], "index")
        for name in ("instruction", "input"):
            if not isinstance(obj.get(name, ""), str):
                raise BadLine(f'"{name}" must be a string')
        if "instruction" not in obj and "input" not in obj:
            raise BadLine('a seed row needs "instruction" and/or "input" (or use "messages")')
        return index, CHAT_URL, {"messages": seed_messages(obj.get("instruction", ""), obj.get("input", ""))}
    if fmt == CHAT:
        if "index" not in obj:
            raise BadLine('missing "index"')
        index = _index(obj["index"], "index")
        body = {k: v for k, v in obj.items() if k != "index"}
        body["messages"] = _messages(obj.get("messages"))
        return index, CHAT_URL, body
    index = _index(obj.get("custom_id"), "custom_id")
    if obj.get("method", "POST") != "POST":
        raise BadLine('a batch row must have "method": "POST"')
    target = endpoint(obj.get("url"))
    body = obj.get("body")
    if not isinstance(body, dict):
        raise BadLine('a batch row needs a "body" object')
    body = dict(body)
    if target.url == CHAT_URL:
        body["messages"] = _messages(body.get("messages"))
        return index, target.url, body
    missing = [name for name in target.prompt[:1] if body.get(name) in (None, "", [])]
    if missing:
        raise BadLine(f'a {target.url} row needs "{missing[0]}" in its body')
    if target.default_model is None and not isinstance(body.get("model"), str):
        raise BadLine(f'a {target.url} row needs "model" in its body (the job\'s model is a chat model)')
    return index, target.url, body


FLEX_URLS = frozenset({CHAT_URL, "/v1/responses"})
"""Endpoints that take ``service_tier: "flex"`` (the Flex lane)."""


def request_body(url: str, body: dict[str, Any], model: str, params: dict[str, Any],
                 lane: str = "sync") -> dict[str, Any]:
    """The full request of a row: for a chat completion, the job's ``model`` and ``params``
    overridden by the row's own; for another endpoint, the row's body (and the endpoint's
    default model when it names none). In the Flex lane, ``service_tier: "flex"`` unless the row
    names a tier."""
    if url == CHAT_URL:
        full = {"model": model, **params, **body}
    else:
        default = ENDPOINTS[url].default_model
        full = {"model": default, **body} if default and "model" not in body else dict(body)
    if lane == "flex" and url in FLEX_URLS and "service_tier" not in full:
        full["service_tier"] = "flex"
    return full


def ask_again(url: str, body: dict[str, Any], answer: str, problem: str) -> dict[str, Any]:
    """The request asked again after an answer that did not match the JSON schema: the
    conversation so far, the answer, and what was wrong with it."""
    fix = (f"Your answer does not match the required JSON schema: {problem}. "
           f"Answer again with JSON that matches the schema.")
    body = dict(body)
    if url == "/v1/responses":
        given = body.get("input")
        history = [{"role": "user", "content": given}] if isinstance(given, str) else list(given or [])
        body["input"] = [*history, {"role": "assistant", "content": answer}, {"role": "user", "content": fix}]
    else:
        body["messages"] = [*body["messages"], {"role": "assistant", "content": answer},
                            {"role": "user", "content": fix}]
    return body


DETERMINISTIC_URLS = frozenset({"/v1/embeddings", "/v1/moderations"})
"""Endpoints whose answer does not depend on chance: identical requests get identical answers."""


def samples(url: str, body: dict[str, Any]) -> bool:
    """Whether a request draws a sample, so that identical requests are not identical work: any
    generation unless its ``temperature`` is 0 and it asks for one choice (``n``, and
    ``best_of`` for completions, absent or 1). A temperature left unset is the API's default, 1."""
    if url in DETERMINISTIC_URLS:
        return False
    temperature = body.get("temperature")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature != 0:
        return True
    return any(body.get(name) not in (None, 1) for name in ("n", "best_of"))


def paid_once(dedupe: bool | None, url: str, body: dict[str, Any]) -> bool:
    """Whether a request is paid once for all the rows of a job that repeat it: ``dedupe`` true
    (always), false (never), or unset (when it does not sample, :func:`samples`)."""
    return dedupe if dedupe is not None else not samples(url, body)


def failure_key(url: str, body: dict[str, Any], fallback: str | None) -> str:
    """What a null that retrying cannot help was the answer to: the request and the fallback model
    it had. A re-run sends the row again only when this changed (another model, parameters,
    ``max_tokens``, a fallback), or with ``--retry-failed``."""
    return request_hash(url, body) if not fallback else request_hash(url, {"request": body, "fallback": fallback})


def request_hash(url: str, body: dict[str, Any]) -> str:
    """The identity of a request (its endpoint and canonical JSON body): rows of a job with the
    same one are paid once (``dedupe``)."""
    canonical = json.dumps([url, body], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


BITMAP_LIMIT = 1 << 24
"""Decimal indices below this are bits (in an :class:`IndexSet`, and in a job's Redis bitmaps):
2 MB per bitmap at most, however sparse the numbers."""


def index_number(index: str) -> int | None:
    """The bit of a canonical small decimal index (``"17"`` -> 17; ``"017"``, ``"x"`` -> None)."""
    if len(index) <= 8 and index.isdigit() and index.isascii() and (index[0] != "0" or len(index) == 1):
        n = int(index)
        return n if n < BITMAP_LIMIT else None
    return None


TaskRow = Sequence[Any]
"""``[index, request]`` or ``[index, request, url]`` (see :func:`split_row`)."""
"""One row as a task carries it: ``(index, request body)``; the key never travels."""


def split_row(row: Sequence[Any]) -> tuple[str, dict[str, Any], str]:
    """``(index, request, endpoint url)`` of a task's row: ``[index, request]`` (a chat completion),
    ``[index, request, url]``, or 0.1's ``[seq, index, request]``."""
    if isinstance(row[-1], dict):
        return str(row[-2]), row[-1], CHAT_URL
    return str(row[0]), row[1], str(row[2])
