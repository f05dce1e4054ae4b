"""A provider behind the engine's seam (``providers.base.Provider``) whose every answer a test
scripts, so that the error policy is tested in milliseconds, without a server or a worker.

``script(call)`` returns what the API does for one call: a chat answer's text (``ok("...")``), an
error response (``error(429, ...)``, which raises :class:`CallFailed` with the failure OpenAI's
classification gives that status, code and headers), or any exception to raise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opt_queue.core import answers
from opt_queue.core.config import ApiKey
from opt_queue.providers import Answer, CallFailed, Failure, Kind
from opt_queue.providers.openai import classify_status


@dataclass
class Call:
    """One call the engine made: with which key, what it sent, and the how-manieth call it was."""

    key: str  # the key's fingerprint
    body: dict[str, Any]
    number: int


@dataclass
class Ok:
    text: str
    prompt_tokens: int = 10
    completion_tokens: int = 5
    limits: dict[str, int] = field(default_factory=dict)
    token_window: tuple[int, int] | None = None


def ok(text: str = "fine", **fields: Any) -> Ok:
    return Ok(text, **fields)


def error(status: int, code: str | None = None, message: str | None = None,
          headers: dict[str, str] | None = None) -> CallFailed:
    """The exception an error response of the API raises: its failure as OpenAI's is classified."""
    kind = "server_error" if status >= 500 else "requests" if status == 429 else "invalid_request_error"
    body = {"error": {"message": message or f"status {status}", "type": kind, "param": None, "code": code}}
    return CallFailed(classify_status(status, body, headers or {}))


class FakeProvider:
    def __init__(self, script: Callable[[Call], Any]) -> None:
        self.script = script
        self.calls: list[Call] = []
        self.closed = False

    def warm_up(self) -> None:
        pass

    async def call(self, key: ApiKey, url: str, body: dict[str, Any], timeout: float,
                   on_send: Callable[[], None] | None = None) -> Answer:
        call = Call(key.fingerprint, dict(body), len(self.calls) + 1)
        self.calls.append(call)
        if on_send is not None:
            on_send()
        outcome = self.script(call)
        if isinstance(outcome, BaseException):
            raise outcome
        data = {"id": f"chatcmpl-{call.number}", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": outcome.text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
                          "total_tokens": outcome.prompt_tokens + outcome.completion_tokens}}
        return Answer(answers.read(url, data), data, request_id=f"req-{call.number}",
                      server_limits=outcome.limits, token_window=outcome.token_window)

    def classify(self, exc: BaseException) -> Failure:
        if isinstance(exc, CallFailed):
            return exc.failure
        if isinstance(exc, (answers.Refused, answers.ContentFiltered)):
            return Failure(Kind.BAD_ROW, str(exc), code="refusal")
        return Failure(Kind.TRANSIENT, f"{type(exc).__name__}: {exc}", code="unexpected_error")

    async def close(self) -> None:
        self.closed = True
